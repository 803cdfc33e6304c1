"""The dashboard's controls (Streamlit): the clickable query image, layer and head
selectors, overlay look, the prediction line and plotly figures."""
from __future__ import annotations

import numpy as np
import streamlit as st

from pages._pickers import ImageChoice
from pages._state import MEAN_OF_HEADS, persistent
from visattn.app import figures, views

QUERY_SIZE = 320  # px of the enlarged, clickable image


def prediction_caption(analysis, choice: ImageChoice) -> str:
    cls, p = analysis.top(1)[0]
    text = f"Predicted **{cls}** ({p:.1%})"
    if choice.label_name is not None:
        text += f" · true **{choice.label_name}** " + ("✓" if cls == choice.label_name else "✗")
    else:  # an upload: its name, so that a page still showing an earlier one cannot be mistaken for it
        text += f" · `{choice.name.replace('`', '')}`"
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


def whole_photo_toggle(analysis) -> bool:
    """Draw maps over the whole photo (True) or the model's input; kept across pages. Not
    drawn (True) when the model saw the whole photo."""
    if figures.crop_is_whole(analysis):
        return True
    return bool(persistent(st.toggle, "Draw maps over the whole photo", "whole_photo",
                           help="The model sees a centre crop of your photo; the maps are placed on it where that "
                                "crop came from, and the rest of the photo is darkened."))


def show_fig(fig, key: str | None = None) -> None:
    """A plotly figure at full width."""
    st.plotly_chart(fig, width="stretch", key=key, config={"displaylogo": False})
