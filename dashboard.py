"""visattn dashboard: see what the attention layers of vision models look at.

Run with ``make run`` (or ``streamlit run dashboard.py``). The pages and their Streamlit
helpers live in ``pages/`` (``pages.main`` routes them with ``st.navigation``);
the plain-Python helpers behind them in ``visattn/app/``; the library in ``visattn/``.
"""
from pages import main

main()
