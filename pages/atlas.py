"""Atlas: the queries and keys of many images (the test set or uploads) embedded together, per head (AttentionViz)."""
from __future__ import annotations

import numpy as np
import streamlit as st

from pages import _pickers as pickers, _state as state
from visattn import atlas as qk_atlas
from visattn import atlas_view
from visattn.app import views
from visattn.errors import VisattnError
from visattn.image_io import MAX_BYTES

SIZES = (200, 500, 1000, 2000)
TOKENS = (1024, 2048, 4096, 8192)
ALL_HEADS = "all heads"
SOURCES = ("Test set", "Uploaded images")
VIEW = st.components.v2.component("visattn_atlas", js=atlas_view.COMPONENT_JS, css=atlas_view.CSS,
                                  isolate_styles=False)  # in the page DOM: the browser test reads it


def open_in_explore(target: dict) -> None:
    """Show this image and query in Explore (session state now, the page switch in :func:`main`)."""
    if "upload" in target:  # Explore's "earlier upload"
        name, data = target["upload"]
        st.session_state.update(uploaded_image=pickers.ImageChoice(data, views.sha256(data), name),
                                image_source=state.IMAGE_SOURCES[1])
    else:
        st.session_state.update(image_source=state.IMAGE_SOURCES[0], sample_index=target["sample_index"])
    st.session_state.update(query_yx=target["query_yx"], layer=target["layer"], head=f"head {target['head']}",
                            atlas_open_explore=True)  # main() switches: st.switch_page fails inside a callback


def point_details(atlas, hm, point: int, uploads: list | None) -> None:
    """The chosen point's image with its grid cell outlined, and the way to Explore."""
    target = atlas_view.point_target(atlas, hm, point)
    if uploads is not None:
        target["upload"] = uploads[target["sample_index"]]
    image = np.asarray(atlas.images[target["image"]]).transpose(1, 2, 0)
    c1, c2 = st.columns([1, 3], vertical_alignment="center")
    c1.image(views.enlarge(image, 192, target["query_yx"], tuple(atlas.layers[hm.layer]["grid"])))
    c2.markdown(f"**{target['caption']}**")
    c2.button("Open this image and query in Explore", key="atlas_open", on_click=open_in_explore, args=(target,))


@st.cache_data(max_entries=8, show_spinner=False)
def payload(_atlas, key: str, layer: str, head: str) -> dict:
    """What the canvas view draws (cached per atlas, layer and head choice)."""
    heads = [h for h in _atlas.heads if h.layer == layer and (head == ALL_HEADS or f"head {h.head}" == head)]
    return atlas_view.atlas_payload(_atlas, heads, panel=420 if len(heads) == 1 else 300)


def uploaded_split(handle):
    """The uploaded images as a data set (kept in the session), or None with a line saying why."""
    ups = st.file_uploader("Images for the atlas", key="atlas_upload", accept_multiple_files=True,
                           max_upload_size=MAX_BYTES // 2**20, help=f"Up to {qk_atlas.MAX_UPLOADS} images.")
    if ups:
        st.session_state["atlas_uploads"] = [(u.name, u.getvalue()) for u in ups]
    files = st.session_state.get("atlas_uploads")
    if not files:
        st.info("Upload images (several at once) to map their queries and keys; each is labelled with the model's "
                "prediction.")
        return None, None
    key = (handle.key, views.sha256(b"".join(views.sha256(data).encode() for _, data in files)))
    kept = st.session_state.get("atlas_upload_split")
    if kept is None or kept[0] != key:
        try:
            with st.spinner("Reading the images…"):
                kept = key, qk_atlas.split_of_images(files, handle.model, handle.meta)
        except VisattnError as e:
            st.error(state.one_line(e))
            return None, None
        st.session_state["atlas_upload_split"] = kept
    return kept[1], files


def main() -> None:
    if st.session_state.pop("atlas_open_explore", False):
        state.switch_to("explore")
    st.title("Atlas: queries and keys of many images, per head")
    st.markdown("Each head's query vectors (green) and key vectors (pink) of many images, embedded together in "
                "2D after AttentionViz's normalisation (keys moved onto the queries' centroid, both scaled to one "
                "mean norm: the softmax of every query is unchanged), so that **near means a large q·k** as far as "
                "`corr` says: the correlation of q·k with minus the 2D distance.")
    handle = pickers.require_model()
    source = state.persistent(st.radio, "Images", "atlas_source", options=list(SOURCES), horizontal=True)
    uploads = None
    if source == SOURCES[0]:
        split = pickers.test_split_or_none()
        if split is None:
            st.info("The test set is not available (set VISATTN_DATA to an image-folder data set); "
                    "upload images instead.")
            return
    else:
        split, uploads = uploaded_split(handle)
        if split is None:
            return
    c1, c2, c3 = st.columns(3)
    n = state.persistent(c1.selectbox, "Images", "atlas_n", options=list(SIZES), disabled=uploads is not None,
                         help="Uploaded images: all of them.")
    method = state.persistent(c2.selectbox, "Embedding", "atlas_method", options=list(qk_atlas.METHODS),
                              format_func=lambda m: {"umap": "UMAP", "pca": "PCA (linear, fast)"}[m])
    tokens = state.persistent(c3.selectbox, "Tokens sampled per layer", "atlas_tokens", options=list(TOKENS))
    params = {"n": len(split) if uploads is not None else int(n), "method": method, "max_tokens": int(tokens)}
    atlas = qk_atlas.build_atlas(handle.model, handle.meta, split, **params, cached_only=True)
    if atlas is None:
        st.info(f"No atlas of these settings for this model yet. Building one runs {params['n']:,} images through "
                f"the model and embeds every head ({method.upper()}; minutes on a CPU), or run `visattn atlas "
                f"CHECKPOINT --n {n} --method {method} --max-tokens {tokens}`.")
        if st.button("Build the atlas", key="atlas_build", type="primary"):
            with st.spinner("Extracting queries and keys, then embedding each head…"):
                qk_atlas.build_atlas(handle.model, handle.meta, split, **params)
            st.rerun()
        return
    st.caption(atlas_view.describe(atlas) + ". Tokens are a random sample when images × tokens is larger.")

    layers = list(atlas.layers)
    c1, c2 = st.columns(2)
    layer = state.persistent(c1.selectbox, "Layer", "layer", options=layers)
    head = state.persistent(c2.selectbox, "Head", "atlas_head",
                            options=[ALL_HEADS, *[f"head {h}" for h in range(atlas.layers[layer]["heads"])]])
    heads = [h for h in atlas.heads if h.layer == layer and (head == ALL_HEADS or f"head {h.head}" == head)]
    st.dataframe([{"head": h.head, "corr (2D)": h.corr, "corr (before embedding)": h.corr_full} for h in heads],
                 hide_index=True, column_config={c: st.column_config.NumberColumn(format="%.3f")
                                                 for c in ("corr (2D)", "corr (before embedding)")})
    st.caption("Point at a dot to see its image patch (left) and the image with that cell outlined; click one to "
               "open it below and from there in Explore. Colour by query/key, row, column, class or norm above "
               "the plots.")
    result = VIEW(data=payload(atlas, atlas.info["key"], layer, head), key="atlas_view", on_picked_change=lambda: None)
    picked = getattr(result, "picked", None)
    if picked:
        st.session_state["atlas_point"] = (picked["layer"], int(picked["head"]), int(picked["point"]))
    chosen = st.session_state.get("atlas_point")
    if chosen and chosen[0] in atlas.layers:
        point_details(atlas, atlas.head(chosen[0], chosen[1]), int(chosen[2]), uploads)


if __name__ == "__main__":  # a fresh server's first request for /atlas (see pages/__init__.py)
    from pages import main as dashboard

    dashboard()
