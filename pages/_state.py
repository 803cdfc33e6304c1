"""Session state and error handling of the dashboard pages (Streamlit).

* :func:`init_state` sets every session-state key once (``DEFAULTS``).
* :func:`persistent`: a widget editing a key that outlives page switches. Those keys
  (``query_yx``, ``alpha``, ``cmap``, ``layer``, ``head``, ...) are plain keys; the widgets
  that edit them use a shadow key ``_w_<name>``, because Streamlit drops the state of
  widgets that a page does not draw. A session's first draw of such a widget takes the
  value the browser sends (:func:`first_draw`): what a tab keeps after its replica died.
* :func:`guard` and :func:`run`: every error becomes one ``st.error`` line; never a traceback.
* :func:`switch_to`: open another page by its URL path (the navigation hands its pages over
  with :func:`set_pages` on every run).
* :func:`policy` (lab or public, :mod:`visattn.serving`) and :func:`slow_turn`: in the
  public mode a slow computation waits its turn in the process's queue.

Testing: ``st.session_state["query_yx"] = (y, x)`` (relative, in [0, 1)) sets the query
point as a click would.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

import streamlit as st

from visattn import serving
from visattn.errors import VisattnError

log = logging.getLogger("visattn.dashboard")

MEAN_OF_HEADS = "mean of heads"
IMAGE_SOURCES = ("Test-set sample", "Upload an image")

DEFAULTS: dict[str, Any] = {
    "model_handle": None,  # ModelHandle of the sidebar's choice (None: no model yet)
    "image_source": IMAGE_SOURCES[0],
    "sample_index": 0,
    "uploaded_image": None,  # ImageChoice of the last good or bad upload, kept across pages
    "query_yx": (0.5, 0.5),  # relative (y, x) of the query point
    "alpha": 0.5,
    "cmap": "inferno",
    "whole_photo": True,  # maps drawn over the whole photo (else over the model's input crop)
    "layer": None,
    "head": MEAN_OF_HEADS,
    "target": -1,  # Compare: class index explained (-1: the predicted class)
    "cam_layer": None,
    "break_scale": 1.0,  # Learn's "break it" step
    "break_sqrt_d": False,
    "break_positions": False,
}


def init_state() -> None:
    """Set every key of :data:`DEFAULTS` that is not set yet (idempotent, every run)."""
    for key, value in DEFAULTS.items():
        if key not in st.session_state:
            st.session_state[key] = value


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextlib.contextmanager
def guard(what: str = "") -> Iterator[None]:
    """Show a VisattnError as one ``st.error`` line; anything unexpected likewise, with the
    traceback going to the server log only. Streamlit's rerun/stop pass through."""
    try:
        yield
    except VisattnError as e:
        st.error(one_line(e))
    except Exception as e:  # a bug: keep the page alive, log the details for engineers
        log.exception("dashboard error%s", f" in {what}" if what else "")
        st.error(f"Something went wrong{f' in {what}' if what else ''}: {type(e).__name__}: {one_line(e)}")


def run(page: Callable[[], None]) -> None:
    """Run a page body under :func:`guard`: whatever escapes it is one ``st.error`` line."""
    with guard("this page"):
        page()


def first_draw(wkey: str) -> bool:
    """True the first time this session draws the widget ``wkey`` (then False)."""
    drawn = st.session_state.setdefault("_drawn_widgets", set())
    if wkey in drawn:
        return False
    drawn.add(wkey)
    return True


def persistent(widget: Callable[..., Any], label: str, key: str, *args: Any,
               options: list | None = None, value_arg: str = "value", **kwargs: Any) -> Any:
    """Draw ``widget`` editing ``st.session_state[key]``, which survives page switches.

    The widget uses the shadow key ``_w_<key>``; for choice widgets (``options`` given) a
    stored value no longer among the options falls back to the first option. ``value_arg``
    names the widget's argument for its initial value (``"default"`` for a multiselect,
    whose options then go in ``args``). The first time
    a session draws the widget, the stored value is only its default, so what the browser
    sends wins: a tab whose replica died reconnects to another one in a new session, and its
    next rerun carries the values its widgets show (image source, layer, head, opacity...).
    """
    wkey = f"_w_{key}"
    value = st.session_state.get(key)
    if options is not None:
        if value not in options:
            value = options[0] if options else None
            st.session_state[key] = value
        args = (options, *args)

    def copy() -> None:
        st.session_state[key] = st.session_state[wkey]

    if first_draw(wkey):
        default = {"index": options.index(value) if options else None} if options is not None else {value_arg: value}
        st.session_state[key] = out = widget(label, *args, key=wkey, on_change=copy, **default, **kwargs)
        return out
    st.session_state[wkey] = value
    return widget(label, *args, key=wkey, on_change=copy, **kwargs)


def policy() -> serving.Policy:
    """This server's policy: ``VISATTN_PUBLIC`` or ``-- --public`` (see :mod:`visattn.serving`)."""
    return serving.policy()


def slow_turn() -> Callable[[], contextlib.AbstractContextManager]:
    """What a slow computation runs under: in the public mode a turn in the process's
    :data:`visattn.serving.SLOW_QUEUE` for this session (one at a time, one per session;
    a refusal is a one-line BusyError), in the lab nothing. Returned as a factory, so that a
    cached function takes it as an unhashed ``_turn`` argument and waits only on a cache miss."""
    queue = policy().slow_queue
    if queue is None:
        return contextlib.nullcontext
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    session = ctx.session_id if ctx is not None else "no-session"
    return lambda: queue.slot(session, timeout=600)


def set_pages(pages: dict[str, st.Page]) -> None:
    """The pages the navigation shows this run, by their ``PageSpec.url_path``, for
    :func:`switch_to` (not by ``st.Page.url_path``: the default page's is "")."""
    st.session_state["_nav_pages"] = dict(pages)


def switch_to(url_path: str) -> None:
    """Open the page at ``url_path`` (``st.switch_page``)."""
    st.switch_page(st.session_state["_nav_pages"][url_path])
