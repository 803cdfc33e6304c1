"""Streamlit helpers shared by the dashboard pages.

* :func:`init_state` sets every session-state key once (``DEFAULTS``).
* :func:`model_picker` (the sidebar) and :func:`require_model`: shipped checkpoints and
  finished runs, a user's ``.safetensors`` upload, a path, or torchvision's ViT-B/16.
  Models are loaded once per process (``st.cache_resource``) keyed on the checkpoint's
  path + mtime + size, the upload's sha256, or the torchvision spec, and shared by every
  session: pages only use ``visattn.capture`` (thread-safe) and ``visattn.explain``
  (which locks) on them, never ``.train()`` or hooks.
* :func:`image_source`: a test-set sample (with its true label) or an upload.
* :func:`analysis_for`: one forward pass per (model key, image sha256), cached; changing
  the query, layer, head, opacity or colormap never runs the model again.
* :func:`guard`: every error becomes one ``st.error`` line; never a traceback.

Session-state keys that outlive a page switch (``query_yx``, ``alpha``, ``cmap``,
``layer``, ``head``, ...) are plain keys; the widgets that edit them use a shadow key
``_w_<name>`` (see :func:`persistent`), because Streamlit drops the state of widgets
that a page does not draw.

Testing: ``st.session_state["query_yx"] = (y, x)`` (relative, in [0, 1)) sets the query
point as a click would.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # pages run by `streamlit run dashboard.py` or directly
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import streamlit as st  # noqa: E402
from torch import nn  # noqa: E402

from visattn import views  # noqa: E402
from visattn import inference, zoo  # noqa: E402
from visattn.checkpoint import MAX_CHECKPOINT_BYTES  # noqa: E402
from visattn.errors import VisattnError  # noqa: E402
from visattn.image_io import MAX_BYTES, MAX_PIXELS  # noqa: E402

log = logging.getLogger("visattn.dashboard")

MODEL_SOURCES = ("Checkpoint", "Upload .safetensors", "Path on the server", "torchvision ViT-B/16")
IMAGE_SOURCES = ("Test-set sample", "Upload an image")
MEAN_OF_HEADS = "mean of heads"
QUERY_SIZE = 320  # px of the enlarged, clickable image
IMAGE_LIMITS = (f"PNG, JPEG, GIF, WebP, TIFF, BMP… · up to {MAX_BYTES // 2**20} MB and "
                f"{MAX_PIXELS / 1e6:.1f} MP · the model sees a centre crop")

DEFAULTS: dict[str, Any] = {
    "model_handle": None,  # ModelHandle of the sidebar's choice (None: no model yet)
    "image_source": IMAGE_SOURCES[0],
    "sample_index": 0,
    "uploaded_image": None,  # ImageChoice of the last good or bad upload, kept across pages
    "query_yx": (0.5, 0.5),  # relative (y, x) of the query point
    "alpha": 0.5,
    "cmap": "inferno",
    "layer": None,
    "head": MEAN_OF_HEADS,
    "target": -1,  # Compare: class index explained (-1: the predicted class)
    "cam_layer": None,
    "train_monitor": None,  # Train: metrics file label shown
}


def init_state() -> None:
    """Set every key of :data:`DEFAULTS` that is not set yet (idempotent, every run)."""
    for key, value in DEFAULTS.items():
        if key not in st.session_state:
            st.session_state[key] = value


def page_start() -> None:
    """The first call of every page.

    A fresh server treats ``pages/`` as an old-style pages folder until the first
    ``st.navigation`` call: a first visit straight to a page URL (a bookmarked /learn)
    would run that page alone, without dashboard.py's layout, navigation and sidebar.
    Streamlit clears that flag itself once ``st.navigation`` runs; clear it here and rerun,
    so dashboard.py runs and opens the requested page.
    """
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()
    init_state()


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


def persistent(widget: Callable[..., Any], label: str, key: str, *args: Any,
               options: list | None = None, **kwargs: Any) -> Any:
    """Draw ``widget`` editing ``st.session_state[key]``, which survives page switches.

    The widget uses the shadow key ``_w_<key>``; for choice widgets (``options`` given) a
    stored value no longer among the options falls back to the first option.
    """
    wkey = f"_w_{key}"
    value = st.session_state.get(key)
    if options is not None:
        if value not in options:
            value = options[0] if options else None
            st.session_state[key] = value
        args = (options, *args)
    st.session_state[wkey] = value

    def copy() -> None:
        st.session_state[key] = st.session_state[wkey]

    return widget(label, *args, key=wkey, on_change=copy, **kwargs)


# ----------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelHandle:
    model: nn.Module
    meta: dict[str, Any]
    key: str  # cache key: path+mtime+size, upload sha256 or torchvision spec
    label: str


@st.cache_resource(max_entries=4, show_spinner=False)
def _load_model(key: str, _spec: str | bytes) -> tuple[nn.Module, dict[str, Any]]:
    return zoo.load_model(_spec)


def _model_summary(meta: dict[str, Any]) -> str:
    acc = meta.get("accuracy")
    parts = [f"**{meta.get('model', '?')}**"]
    if isinstance(acc, (int, float)):
        parts.append(f"{acc:.1%} test accuracy")
    if meta.get("params"):
        parts.append(f"{int(meta['params']):,} parameters")
    if meta.get("epochs"):
        parts.append(f"{meta['epochs']} epochs")
    parts.append(f"{len(meta.get('classes', []))} classes")
    return " · ".join(parts)


def model_picker() -> ModelHandle | None:
    """The sidebar model choice; stores and returns a :class:`ModelHandle` (None: none yet)."""
    init_state()
    handle = None
    with st.sidebar:
        st.header("Model")
        source = st.radio("Model source", MODEL_SOURCES, key="model_source")
        spec: str | bytes | None = None
        key = label = ""
        if source == MODEL_SOURCES[0]:
            checkpoints = views.list_checkpoints()
            if not checkpoints:
                st.info("No checkpoint yet in checkpoints/ or runs/. The default one appears after its first "
                        "training epoch; meanwhile pick the torchvision ViT or upload a checkpoint.")
            else:
                label = st.selectbox("Checkpoint", list(checkpoints), key="checkpoint_label",
                                     format_func=lambda lab: views.describe_checkpoint(lab, checkpoints[lab]))
                spec = checkpoints[label]["path"]
                with guard("checkpoint"):
                    key = views.checkpoint_key(spec)
        elif source == MODEL_SOURCES[1]:
            limit = MAX_CHECKPOINT_BYTES // 2**20
            up = st.file_uploader("Your visattn checkpoint", type=["safetensors"], key="checkpoint_upload",
                                  max_upload_size=limit)
            st.caption(f".safetensors written by visattn (no pickles), up to {limit} MB; "
                       "checked before any model is built.")
            if up is not None:
                spec = up.getvalue()
                key, label = f"upload:{views.sha256(spec)}", up.name
        elif source == MODEL_SOURCES[2]:
            path = st.text_input("Checkpoint path", key="checkpoint_path", placeholder="runs/my_run.safetensors")
            if path.strip():
                p = Path(path.strip()).expanduser()
                p = p if p.is_absolute() else ROOT / p
                if not p.is_file():
                    st.error(f"checkpoint not found: {path.strip()}")
                else:
                    spec, key, label = str(p), views.checkpoint_key(p), path.strip()
        else:
            weights = st.radio("Weights", ("none", "DEFAULT"), key="vit_weights", horizontal=True,
                               format_func=lambda w: "random (offline)" if w == "none" else "ImageNet (download)")
            spec = key = f"torchvision:vit_b_16:{weights}"
            label = f"torchvision vit_b_16 ({'random weights' if weights == 'none' else 'ImageNet weights'})"
        if spec is not None and key:
            try:
                with st.spinner("Loading the model…"):
                    model, meta = _load_model(key, spec)
                handle = ModelHandle(model, meta, key, label)
                st.caption(_model_summary(meta))
            except VisattnError as e:
                st.error(one_line(e))
            except Exception as e:  # not a library refusal: log it, one line on the page
                log.exception("loading a model")
                st.error(f"cannot load this model: {type(e).__name__}: {one_line(e)}")
    st.session_state["model_handle"] = handle
    return handle


def require_model() -> ModelHandle:
    """The sidebar's model (drawing the picker when a page runs on its own); stops the
    page with an ``st.info`` when there is none."""
    init_state()
    if not st.session_state.get("_in_dashboard"):  # a page file run on its own (tests)
        model_picker()
    handle = st.session_state.get("model_handle")
    if handle is None:
        st.info("Choose a model in the sidebar to begin.")
        st.stop()
    return handle


# ----------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImageChoice:
    data: bytes
    sha: str
    name: str
    label: int | None = None  # true class index (test-set samples)
    label_name: str | None = None


@st.cache_resource(max_entries=2, show_spinner=False)
def test_split(path: str):
    """The test split at ``path`` (decoded once per process)."""
    return views.load_test_split(path)


def test_split_or_none():
    """The test split, or None when the data set is absent."""
    path = views.data_path()
    if not views.data_available(path):
        return None
    with st.spinner("Reading the test set…"):
        return test_split(str(path))


def image_source(key: str = "image") -> ImageChoice | None:
    """Choose a test-set sample (with its true label) or upload an image; None: no image."""
    source = persistent(st.radio, "Image", "image_source", options=list(IMAGE_SOURCES), horizontal=True)
    if source == IMAGE_SOURCES[0]:
        split = None
        with guard("the test set"):
            split = test_split_or_none()
        if split is None:
            st.info(f"The test set is not available at {views.data_path()} (set VISATTN_DATA to an image-folder "
                    "data set with a test/ split). Upload an image instead.")
            return None
        n = len(split)
        st.session_state["sample_index"] = min(int(st.session_state["sample_index"]), n - 1)
        c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
        with c1:
            index = persistent(st.number_input, f"Test image (0–{n - 1})", "sample_index", min_value=0,
                               max_value=n - 1, step=1)

        def shuffle() -> None:
            st.session_state["sample_index"] = int(np.random.default_rng().integers(n))

        c2.button("Random", key=f"{key}_random", on_click=shuffle, help="pick a random test image")
        index = int(index)
        label = int(split.labels[index])
        data = views.sample_png(split, index)
        choice = ImageChoice(data, views.sha256(data), f"test image {index}", label, split.classes[label])
        st.caption(f"True label: **{choice.label_name}**")
        return choice
    up = st.file_uploader("Upload an image", key=f"{key}_upload", max_upload_size=MAX_BYTES // 2**20,
                          help="Any common image format; it is checked before use.")
    st.caption(IMAGE_LIMITS)
    if up is not None:
        data = up.getvalue()
        choice = ImageChoice(data, views.sha256(data), up.name)
        st.session_state["uploaded_image"] = choice
        return choice
    choice = st.session_state.get("uploaded_image")
    if choice is None:
        st.info("Upload an image to begin, or switch to a test-set sample.")
        return None
    st.caption(f"Using your earlier upload: {choice.name}")
    return choice


@st.cache_resource(max_entries=32, show_spinner=False)
def _analyse(model_key: str, image_sha: str, _model: nn.Module, _meta: dict[str, Any], _data: bytes):
    return inference.analyse(_model, _meta, _data)


def analysis_for(handle: ModelHandle, choice: ImageChoice):
    """The cached :class:`visattn.inference.Analysis` of this image by this model, or None
    after showing one ``st.error`` line (bad image)."""
    try:
        with st.spinner("Running the model…"):
            return _analyse(handle.key, choice.sha, handle.model, handle.meta, choice.data)
    except VisattnError as e:
        st.error(one_line(e))
    except Exception as e:
        log.exception("analysing an image")
        st.error(f"cannot analyse this image: {type(e).__name__}: {one_line(e)}")
    return None



def image_and_analysis(handle: ModelHandle, key: str, column) -> tuple[ImageChoice, Any]:
    """The image source widget drawn in ``column``, then its cached analysis; stops the page
    (after the widget's message or one ``st.error`` line) when there is no usable image."""
    with column:
        choice = image_source(key)
    if choice is None:
        st.stop()
    analysis = analysis_for(handle, choice)
    if analysis is None:
        st.stop()
    return choice, analysis

def prediction_caption(analysis, choice: ImageChoice) -> str:
    cls, p = analysis.top(1)[0]
    text = f"Predicted **{cls}** ({p:.1%})"
    if choice.label_name is not None:
        text += f" · true **{choice.label_name}** " + ("✓" if cls == choice.label_name else "✗")
    return text


# ----------------------------------------------------------------------------- controls
def query_picker(image: np.ndarray, grid: tuple[int, int] | None = None, key: str = "query",
                 size: int = QUERY_SIZE, sliders: bool = True) -> tuple[float, float]:
    """The image enlarged to ``size`` px with the query marked: click it to move the query;
    row/column sliders (model-input pixels) do the same from the keyboard. Returns (y, x)."""
    from streamlit_image_coordinates import streamlit_image_coordinates

    side = int(image.shape[0])
    click_key = f"{key}_click"

    def on_click() -> None:
        yx = views.click_to_yx(st.session_state.get(click_key))
        if yx is not None:
            st.session_state["query_yx"] = yx

    yx = tuple(st.session_state["query_yx"])
    streamlit_image_coordinates(views.enlarge(image, size, yx, grid), width=size, key=click_key, on_click=on_click,
                                cursor="crosshair")
    if sliders:
        row, col = views.yx_to_pixel(yx, side)
        st.session_state[f"_w_{key}_row"], st.session_state[f"_w_{key}_col"] = row, col

        def from_sliders() -> None:
            r, c = st.session_state[f"_w_{key}_row"], st.session_state[f"_w_{key}_col"]
            st.session_state["query_yx"] = views.pixel_to_yx(r, c, side)

        c1, c2 = st.columns(2)
        c1.slider("Query row (y)", 0, side - 1, key=f"_w_{key}_row", on_change=from_sliders)
        c2.slider("Query column (x)", 0, side - 1, key=f"_w_{key}_col", on_change=from_sliders)
    return yx


def layer_head_selectors(trace, key: str = "") -> tuple[str, int | None]:
    """Layer and head selectors (head: a number or "mean of heads"); returns (layer, head or None)."""
    layers = list(trace.attention)
    c1, c2 = st.columns(2)
    with c1:
        layer = persistent(st.selectbox, "Layer", "layer", options=layers)
    heads = [MEAN_OF_HEADS, *[f"head {h}" for h in range(trace.attention[layer].heads)]]
    with c2:
        head = persistent(st.selectbox, "Head", "head", options=heads)
    return layer, None if head == MEAN_OF_HEADS else int(head.split()[1])


def look_controls() -> tuple[float, str]:
    """Opacity slider and colormap select (kept across pages)."""
    c1, c2 = st.columns(2)
    with c1:
        alpha = persistent(st.slider, "Overlay opacity", "alpha", 0.0, 1.0, step=0.05)
    with c2:
        cmap = persistent(st.selectbox, "Colormap", "cmap", options=list(views.COLORMAPS))
    return float(alpha), str(cmap)


def show_fig(fig, key: str | None = None) -> None:
    """A plotly figure at full width."""
    st.plotly_chart(fig, width="stretch", key=key, config={"displaylogo": False})
