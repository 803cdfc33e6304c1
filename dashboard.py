"""visattn dashboard: see what the attention layers of vision models look at.

Run with ``make run`` (or ``streamlit run dashboard.py``). Pages live in ``pages/``;
their shared Streamlit helpers in ``pages/_shared.py``; the plain-Python helpers in
``visattn/``: ``views`` (images and query positions), ``lesson`` (the Learn page),
``evaluation`` (Models, Compare), ``runs`` (Train) and ``figures`` (plotly charts).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

st.set_page_config(layout="wide", page_title="visattn", page_icon=":material/visibility:")

from pages import _shared as ui  # noqa: E402

ui.init_state()  # every session-state key, once
st.session_state["_in_dashboard"] = True  # pages use the sidebar picker below, not their own

pg = st.navigation([
    st.Page("pages/explore.py", title="Explore", icon=":material/search:", default=True),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare:"),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("pages/models.py", title="Models", icon=":material/leaderboard:"),
    st.Page("pages/learn.py", title="Learn", icon=":material/school:"),
])
ui.model_picker()
pg.run()
