"""Atlas: the queries and keys of many test images embedded together, per head (AttentionViz)."""
from __future__ import annotations

import numpy as np
import streamlit as st

from pages import _pickers as pickers, _state as state
from visattn import atlas as qk_atlas
from visattn import atlas_view
from visattn.app import views

SIZES = (200, 500, 1000, 2000)
TOKENS = (1024, 2048, 4096, 8192)
ALL_HEADS = "all heads"


def open_in_explore(target: dict) -> None:
    """Show this image and query in Explore (session state, then the page switch)."""
    st.session_state.update(image_source=state.IMAGE_SOURCES[0], sample_index=target["sample_index"],
                            query_yx=target["query_yx"], layer=target["layer"], head=f"head {target['head']}")
    state.switch_to("explore")


def point_details(atlas, hm, point: int) -> None:
    """The chosen point's image with its grid cell outlined, and the way to Explore."""
    target = atlas_view.point_target(atlas, hm, point)
    image = np.asarray(atlas.images[target["image"]]).transpose(1, 2, 0)
    c1, c2 = st.columns([1, 3], vertical_alignment="center")
    c1.image(views.enlarge(image, 192, target["query_yx"], tuple(atlas.layers[hm.layer]["grid"])))
    c2.markdown(f"**{target['caption']}**")
    c2.button("Open this image and query in Explore", key="atlas_open", on_click=open_in_explore, args=(target,))


def main() -> None:
    st.title("Atlas: queries and keys of many images, per head")
    st.markdown("Each head's query vectors (green) and key vectors (pink) of many test images, embedded together in "
                "2D after AttentionViz's normalisation (keys moved onto the queries' centroid, both scaled to one "
                "mean norm: the softmax of every query is unchanged), so that **near means a large q·k**. "
                "`corr` is how well that holds: the correlation of q·k with minus the 2D distance.")
    handle = pickers.require_model()
    split = pickers.test_split_or_none()
    if split is None:
        st.info(f"The test set is not available (set VISATTN_DATA to an image-folder data set); "
                "the atlas maps its images.")
        return
    c1, c2, c3 = st.columns(3)
    n = state.persistent(c1.selectbox, "Images", "atlas_n", options=list(SIZES))
    method = state.persistent(c2.selectbox, "Embedding", "atlas_method", options=list(qk_atlas.METHODS),
                              format_func=lambda m: {"umap": "UMAP", "pca": "PCA (linear, fast)"}[m])
    tokens = state.persistent(c3.selectbox, "Tokens sampled per layer", "atlas_tokens", options=list(TOKENS))
    params = {"n": int(n), "method": method, "max_tokens": int(tokens)}
    atlas = qk_atlas.build_atlas(handle.model, handle.meta, split, **params, cached_only=True)
    if atlas is None:
        st.info(f"No atlas of these settings for this model yet. Building one runs {n:,} images through the model and "
                f"embeds every head ({method.upper()}; minutes on a CPU), or run `visattn atlas CHECKPOINT --n {n} "
                f"--method {method} --max-tokens {tokens}`.")
        if st.button("Build the atlas", key="atlas_build", type="primary"):
            with st.spinner("Extracting queries and keys, then embedding each head…"):
                qk_atlas.build_atlas(handle.model, handle.meta, split, **params)
            st.rerun()
        return
    st.caption(atlas_view.describe(atlas) + ". Tokens are a random sample when images × tokens is larger.")

    layers = list(atlas.layers)
    c1, c2, c3 = st.columns(3)
    layer = state.persistent(c1.selectbox, "Layer", "layer", options=layers)
    head = state.persistent(c2.selectbox, "Head", "atlas_head",
                            options=[ALL_HEADS, *[f"head {h}" for h in range(atlas.layers[layer]["heads"])]])
    colour = state.persistent(c3.selectbox, "Colour by", "atlas_colour", options=list(atlas_view.COLOUR_BY),
                              format_func=lambda c: {"kind": "query / key"}.get(c, c))
    heads = [h for h in atlas.heads if h.layer == layer and (head == ALL_HEADS or f"head {h.head}" == head)]
    st.dataframe([{"head": h.head, "corr (2D)": h.corr, "corr (before embedding)": h.corr_full} for h in heads],
                 hide_index=True, column_config={c: st.column_config.NumberColumn(format="%.3f")
                                                 for c in ("corr (2D)", "corr (before embedding)")})
    fig = atlas_view.atlas_figure(atlas, heads, colour, cols=2 if len(heads) > 1 else 1, panel=420)
    event = st.plotly_chart(fig, width="stretch", key="atlas_plot", on_select="rerun", selection_mode="points",
                            config={"displaylogo": False})
    points = [p for p in event.selection.points if p.get("customdata")] if event else []
    if points:
        custom = points[0]["customdata"]
        st.session_state["atlas_point"] = (layer, int(custom[8]), int(custom[9]))
    st.caption("Hover a point for its image, class, cell and norm; click one to see it and open it in Explore.")
    chosen = st.session_state.get("atlas_point")
    if chosen and chosen[0] in atlas.layers:
        point_details(atlas, atlas.head(chosen[0], chosen[1]), int(chosen[2]))


if __name__ == "__main__":  # a fresh server's first request for /atlas (see pages/__init__.py)
    from pages import main as dashboard

    dashboard()
