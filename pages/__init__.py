"""The dashboard's Streamlit pages, routed by ``st.navigation`` alone (:func:`main`).

Each page module has a ``main()`` that draws the page; :data:`PAGES` hands them to
``st.Page`` as callables with their URL paths, so a bookmarked ``/learn`` opens Learn
inside the navigation, sidebar included. The Streamlit helpers the pages share are split
by concern: ``_state`` (session state, error lines), ``_pickers`` (model, image,
cached analysis), ``_controls`` (query image, layer/head, look, figures). What does not
need Streamlit lives in ``visattn.app``.

Streamlit treats a ``pages/`` folder next to the entry script as its old (v1)
auto-discovered page list until the process first calls ``st.navigation``: on a fresh
server the very first request for ``/learn`` runs ``pages/learn.py`` as a script. So each
page module ends with ``if __name__ == "__main__": main()`` of this package, and that
first request also opens inside the navigation (``tests/test_browser.py`` proves it).
Only public Streamlit behaviour is used: no private flags, no ``sys.path`` edits.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import streamlit as st

from pages import _pickers, _state, atlas, compare, explore, learn, models, train
from visattn import serving


class PageSpec(NamedTuple):
    url_path: str
    title: str
    icon: str
    main: Callable[[], None]  # the module's main(): draws the page


PAGES: tuple[PageSpec, ...] = (
    PageSpec("explore", "Explore", ":material/search:", explore.main),
    PageSpec("compare", "Compare", ":material/compare:", compare.main),
    PageSpec("train", "Train", ":material/model_training:", train.main),
    PageSpec("models", "Models", ":material/leaderboard:", models.main),
    PageSpec("learn", "Learn", ":material/school:", learn.main),
    PageSpec("atlas", "Atlas", ":material/scatter_plot:", atlas.main),
)


def page(spec: PageSpec, default: bool = False) -> st.Page:
    """The ``st.Page`` of a page."""
    return st.Page(functools.partial(_state.run, spec.main), title=spec.title, icon=spec.icon,
                   url_path=spec.url_path, default=default)


def training_off() -> None:
    """What a direct request to /train gets on a public server."""
    st.title("Train a model")
    st.error("Training is off on this public server: ask for the lab server to train models.")


def allowed_pages(policy: serving.Policy) -> tuple[PageSpec, ...]:
    """The pages of :data:`PAGES` the navigation shows under ``policy`` (no Train when training is off)."""
    return tuple(spec for spec in PAGES if policy.train or spec.url_path != "train")


def main(start: str = "explore") -> None:
    """The whole dashboard: page config, session state, the navigation, the sidebar model
    picker, then the page the URL names (``start`` when it names none). In the public mode
    (:func:`visattn.serving.policy`) the Train page is left out of the navigation, /train
    answers with one line, and a banner on every page says what is off."""
    st.set_page_config(layout="wide", page_title="visattn", page_icon=":material/visibility:")
    _state.init_state()
    policy = _state.policy()
    pages = {spec.url_path: page(spec, default=spec.url_path == start) for spec in allowed_pages(policy)}
    if not policy.train:  # a bookmarked /train: one line, not Explore in its place
        pages["train"] = st.Page(training_off, title="Train", url_path="train", visibility="hidden",
                                 default=start == "train")
    _state.set_pages(pages)
    nav = st.navigation(list(pages.values()))
    if policy.public:
        st.info(policy.banner(), icon=":material/public:")
    _pickers.model_picker()
    nav.run()
