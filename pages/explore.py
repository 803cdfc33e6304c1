"""Explore: click a point of the image; see where every layer and head looks from there."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from pages import _controls as controls, _pickers as pickers, _state as state
from visattn import ablation, inference, maps, panels, plotting
from visattn.app import figures, views


GRID_LAYERS = 4  # layers drawn by default: each adds a row of panels


def layer_maps(analysis, yx: tuple[float, float], layers: tuple[str, ...]) -> dict:
    """``{layer: (heads, h, w)}`` attention of the query at ``yx``, for the chosen layers."""
    return {k: v for k, v in views.query_layer_maps(analysis.trace, yx).items() if k in layers}


def overlay_jpeg(analysis, m, alpha: float, cmap: str, whole_photo: bool) -> bytes:
    """A map scaled to [0, 1] over the whole photo or the enlarged model input, as JPEG."""
    return panels.to_jpeg(figures.overlay_view(analysis, maps.normalise(m), alpha, cmap, whole_photo))


@st.cache_data(max_entries=64, show_spinner=False)
def grid_jpeg(model_key: str, image_sha: str, yx: tuple[float, float], alpha: float, cmap: str,
             layers: tuple[str, ...], _analysis) -> bytes:
    """The layers × heads overlay grid for one query, as JPEG (a raster composed in numpy:
    a query click must redraw it in milliseconds)."""
    return panels.to_jpeg(panels.overlay_grid_image(_analysis.image, layer_maps(_analysis, yx, layers), alpha, cmap,
                                                    yx, size=160))


def grid_figure_png(analysis, yx: tuple[float, float], alpha: float, cmap: str, layers: tuple[str, ...]) -> bytes:
    """The same grid drawn by matplotlib for the download (rendered only when asked for)."""
    fig = plotting.overlay_grid_figure(views.shrink(analysis.image, 128), layer_maps(analysis, yx, layers), alpha,
                                       cmap, yx)
    return plotting.figure_to_png(fig, dpi=150)


@st.cache_resource(max_entries=64, show_spinner=False)
def topk_figure(model_key: str, image_sha: str, _analysis):
    """The top-k bar chart (read-only once built, so sessions may share it)."""
    return plotting.topk_bar_figure(_analysis.classes, _analysis.probs, k=min(5, len(_analysis.classes)))


@st.cache_data(max_entries=64, show_spinner=False)
def query_free_overlays(model_key: str, image_sha: str, alpha: float, cmap: str, whole_photo: bool,
                        _analysis) -> list[tuple[str, bytes]]:
    """Attention received by each position (last two layers) and rollout: they do not
    depend on the query, so a click does not redraw them."""
    trace = _analysis.trace
    items = [(f"attention received ({name})", m) for name, m in views.received_maps(trace).items()][-2:]
    roll = views.rollout_or_none(trace)
    if roll is not None:
        items.append(("attention rollout (all layers)", roll))
    return [(title, overlay_jpeg(_analysis, m, alpha, cmap, whole_photo)) for title, m in items]


def session_file(handle, choice) -> bytes:
    """The offline HTML session of this image (``visattn export``); the slow methods are
    left out of its faithfulness table for models that take minutes on this machine."""
    from visattn import explain, export
    from visattn.app import evaluation

    methods = tuple(m for m, row in explain.METHODS.items() if not row.slow) \
        if evaluation.is_heavy(handle.model, handle.meta) else None
    return export.session_html(handle.model, handle.meta, choice.data, name=choice.name, methods=methods).encode()


@st.cache_data(max_entries=64, show_spinner=False)
def head_importance_fig(model_key: str, image_sha: str, _model, _analysis):
    """Layers × heads Δ probability of the predicted class, one forward per layer (cached per image)."""
    effects = ablation.head_importance(_model, _analysis.tensor.to(next(_model.parameters()).device))
    return figures.head_importance_figure(effects, _analysis.classes[effects.targets[0]])


@st.cache_data(max_entries=256, show_spinner=False)
def ablated_probs(model_key: str, image_sha: str, off: tuple[tuple[str, int], ...], _model, _analysis):
    """Class probabilities with the heads in ``off`` ablated: one forward, no capture."""
    x = _analysis.tensor.to(next(_model.parameters()).device)
    logits = ablation.ablate(_model, x, views.head_spec(list(off)))
    return logits[0].float().softmax(-1).cpu().numpy()


@st.cache_data(max_entries=64, show_spinner=False)
def patching_fig(model_key: str, image_sha: str, corrupted_sha: str, _model, _analysis, _corrupted):
    """Layers × heads share of the logit difference restored by each clean head (cached per pair)."""
    device = next(_model.parameters()).device
    effects = ablation.patching_effects(_model, _analysis.tensor.to(device), _corrupted.to(device))
    return figures.patching_figure(effects)


def patching_lab(handle, choice, analysis) -> None:
    """Activation patching: this image is the clean run; the corrupted run is it blurred, or an upload."""
    if not st.toggle("Activation patching: which heads carry the difference to a corrupted image?",
                     key="explore_patching", help="Each head's output from this (clean) image is put into the "
                     "corrupted run alone; the heatmap shows how much of the logit difference it restores."):
        return
    how = st.radio("Corrupted image", ["This image, blurred", "Another image (upload)"], horizontal=True,
                   key="patching_source")
    if how == "This image, blurred":
        corrupted, sha = views.blurred(analysis.tensor), f"{choice.sha}:blur"
    else:
        up = st.file_uploader("Corrupted image", key="patching_upload", max_upload_size=pickers.MAX_BYTES // 2**20)
        if up is None:
            st.caption("Upload the corrupted image to compare with this one.")
            return
        with state.guard("the corrupted image"):
            corrupted, sha = inference.prepare(up.getvalue(), handle.meta)[1], views.sha256(up.getvalue())
    with state.guard("the patching effects"), st.spinner("Patching every head…"):
        controls.show_fig(patching_fig(handle.key, choice.sha, sha, handle.model, analysis, corrupted),
                          key="explore_patching_fig")


def head_lab(handle, choice, analysis) -> None:
    """Head importance heatmap and head toggles that rerun the prediction without those heads."""
    st.header("What each head does for the prediction")
    if not st.toggle("Head lab: switch heads off and watch the prediction", key="explore_heads",
                     help="Each head's output (its weights @ V) is replaced by zeros; one extra forward per layer."):
        return
    with state.guard("the head importance"), st.spinner("Ablating every head…"):
        controls.show_fig(head_importance_fig(handle.key, choice.sha, handle.model, analysis), key="explore_importance")
    patching_lab(handle, choice, analysis)
    options = [(layer, h) for layer, site in analysis.trace.attention.items() for h in range(site.heads)]
    off = st.multiselect("Heads switched off", options, format_func=lambda o: f"{o[0]} · head {o[1]}",
                         key=f"heads_off_{handle.key}")
    if not off:
        st.caption("Pick heads above: the top-k bars are recomputed without them.")
        return
    with state.guard("the ablated prediction"):
        probs = ablated_probs(handle.key, choice.sha, tuple(sorted(off)), handle.model, analysis)
        before, after = st.columns(2)
        with before:
            controls.show_fig(topk_figure(handle.key, choice.sha, analysis), key="explore_topk_before")
        with after:
            fig = plotting.topk_bar_figure(analysis.classes, probs, k=min(5, len(analysis.classes)))
            fig.update_layout(title=f"top-{min(5, len(analysis.classes))} with {len(off)} head(s) off")
            controls.show_fig(fig, key="explore_topk_after")


def main() -> None:
    st.title("Explore: what does each attention head look at?")
    handle = pickers.require_model()

    left, right = st.columns([1, 1], gap="large")
    choice, analysis = pickers.image_and_analysis(handle, "explore", left)
    trace = analysis.trace
    sites = trace.attention
    layer_now = st.session_state.get("layer") if st.session_state.get("layer") in sites else next(iter(sites), None)

    with left:
        st.markdown("**Click the image** to choose the query point (the cyan cross).")
        yx = controls.query_picker(analysis.image, sites[layer_now].grid if layer_now else None, key="explore")
    with right:
        st.markdown(controls.prediction_caption(analysis, choice))
        controls.show_fig(topk_figure(handle.key, choice.sha, analysis), key="explore_topk")
        alpha, cmap = controls.look_controls()
        whole = controls.whole_photo_toggle(analysis)

    if not sites and trace.skipped:
        st.info("No attention layer of this model could be captured (named above), so there is no query to follow "
                "here; the Compare page shows gradient-based explanations.")
    elif not sites:
        st.info("This model has no self-attention layers, so there is no query to follow. "
                + ("Its squeeze-and-excitation (SE) channel weights and CBAM spatial maps are shown below; "
                   if trace.channel or trace.spatial else "It has no SE or CBAM attention either; ")
                + "the Compare page shows gradient-based explanations.")
    else:
        st.header("Every layer and head, for this query")
        names = list(sites)
        shown = names
        if len(names) > GRID_LAYERS:
            spread = [names[round(i * (len(names) - 1) / (GRID_LAYERS - 1))] for i in range(GRID_LAYERS)]
            shown = st.multiselect("Layers in the grid", names, default=spread, key=f"grid_layers_{handle.key}",
                                   help="Each extra layer adds a row of panels and takes longer to draw.") or spread
        with state.guard("the overlay grid"), st.spinner("Drawing the overlays…"):
            jpeg = grid_jpeg(handle.key, choice.sha, tuple(yx), alpha, cmap, tuple(shown), analysis)
            st.image(jpeg, caption="Rows: attention layers. Columns: heads, then their mean. One shared colour scale "
                                  "(attention weight); the cyan + marks the query.", output_format="JPEG")
            c1, c2, c3, _ = st.columns([1, 1, 1, 1])
            c1.download_button("Download figure (PNG)",
                               lambda: grid_figure_png(analysis, tuple(yx), alpha, cmap, tuple(shown)),
                               file_name="attention_layers_heads.png", mime="image/png", key="dl_png")
            c2.download_button("Download raw maps (NPZ)",
                               lambda: plotting.maps_to_npz(views.raw_maps(trace, analysis.probs, yx)),
                               file_name="attention_maps.npz", mime="application/octet-stream", key="dl_npz")
            c3.download_button("Download offline session (HTML)", lambda: session_file(handle, choice),
                               file_name=f"visattn_{Path(choice.name).stem}.html", mime="text/html", key="dl_html",
                               help="One self-contained file: the prediction, every layer and head, the Q/K maps "
                                    "for any query you click, rollout and faithfulness scores. Opens offline.")

        st.header("One layer, one head: how the scores are made")
        layer, head = controls.layer_head_selectors(trace)
        site = sites[layer]
        with state.guard("the similarity maps"):
            sim = views.similarity_maps(site, yx, head)
            st.caption(f"Layer **{layer}** ({site.grid[0]}×{site.grid[1]} grid, {site.heads} heads, "
                       f"{site.similarity} similarity), {'mean of heads' if head is None else f'head {head}'}: "
                       "the weights the layer really used, the raw dot product q·k, the cosine similarity and the "
                       "textbook softmax(q·k/√d_k).")
            if st.toggle("Interactive charts (hover to read each value)", key="explore_interactive",
                         help="Plotly charts: slower to redraw on every click."):
                fig = plotting.similarity_figure(views.shrink(analysis.image, 128), sim, yx, cmap)
                fig.update_layout(height=380, font={"size": 14})
                controls.show_fig(fig, key="explore_similarity")
            else:
                st.image(panels.to_jpeg(panels.heatmap_panels(analysis.image, sim, plotting.SIMILARITY_LABELS, yx,
                                                             cmap, size=200)), output_format="JPEG")

        st.header("Averaged over heads, and rolled out through the layers")
        with state.guard("the averaged maps"):
            averaged = [("this query, mean of heads", overlay_jpeg(analysis, sim["attention"], alpha, cmap, whole))]
            averaged += query_free_overlays(handle.key, choice.sha, alpha, cmap, whole, analysis)
            cols = st.columns(max(4, len(averaged)))
            for col, (title, jpeg) in zip(cols, averaged):
                col.image(jpeg, caption=title, width="stretch", output_format="JPEG")
            st.caption("Each map is scaled from its own minimum (dark) to its maximum (bright).")

        head_lab(handle, choice, analysis)

    if trace.channel or trace.spatial:
        st.header("Channel (SE) and spatial (CBAM) attention")
        with state.guard("the SE/CBAM maps"):
            for name, site in trace.channel.items():
                controls.show_fig(plotting.channel_bar_figure(site.weights[0].float().cpu().numpy(),
                                                              f"SE channel weights · {name}"), key=f"se_{name}")
            if trace.spatial:
                cols = st.columns(len(trace.spatial))
                for col, (name, site) in zip(cols, trace.spatial.items()):
                    m = site.map[0, 0].float().cpu().numpy()
                    col.image(figures.overlay_view(analysis, m, alpha, cmap, whole, vmin=0.0, vmax=1.0),
                              caption=f"CBAM spatial map · {name} (0 = suppressed, 1 = kept)", width="stretch")



if __name__ == "__main__":  # a fresh server's first request for /explore (see pages/__init__.py)
    from pages import main as dashboard

    dashboard()
