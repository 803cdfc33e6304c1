"""The dashboard's plain-Python helpers (no Streamlit import, unit-tested on their own).

``views`` (images, query positions, the Explore maps), ``figures`` (plotly charts),
``lesson`` (the Learn page's numbers), ``evaluation`` (Models and Compare), ``runs``
(background training of the Train page). The library (``visattn`` outside this
package) imports nothing from here; the Streamlit pages in ``pages/`` do.
"""
