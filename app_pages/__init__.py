"""The dashboard's Streamlit pages, routed by ``st.navigation`` alone (:func:`main`).

Each page module has a ``main()`` that draws the page; :data:`PAGES` hands them to
``st.Page`` as callables with their URL paths, so a bookmarked ``/learn`` opens Learn
inside the navigation, sidebar included. The Streamlit helpers the pages share are split
by concern: ``_state`` (session state, error lines), ``_pickers`` (model, image,
cached analysis), ``_controls`` (query image, layer/head, look, figures). What does not
need Streamlit lives in ``visattn.app``.

This folder is not called ``pages/`` on purpose: Streamlit treats a ``pages/`` folder next
to the entry script as its old auto-discovered page list until the first ``st.navigation``
call of the process, so on a fresh server a first visit to ``/learn`` would run that file
alone.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import streamlit as st

from app_pages import _pickers, _state, compare, explore, learn, models, train


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
)


def main(start: str = "explore") -> None:
    """The whole dashboard: page config, session state, the navigation, the sidebar model
    picker, then the page the URL names (``start`` when it names none)."""
    st.set_page_config(layout="wide", page_title="visattn", page_icon=":material/visibility:")
    _state.init_state()
    nav = st.navigation([
        st.Page(functools.partial(_state.run, spec.main), title=spec.title, icon=spec.icon,
                url_path=spec.url_path, default=spec.url_path == start)
        for spec in PAGES
    ])
    _pickers.model_picker()
    nav.run()
