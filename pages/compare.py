"""Compare: attention maps beside gradient and perturbation explanations, and how
faithful each one is (deletion/insertion) and whether it depends on the weights (sanity)."""
from __future__ import annotations

import contextlib

import streamlit as st

from pages import _controls as controls, _pickers as pickers, _state as state
from visattn import explain, maps
from visattn.app import evaluation, figures, views
from visattn.faithfulness import faithfulness_for

METHODS = explain.METHODS
PER_ROW = 3  # maps side by side


@st.cache_data(max_entries=256, show_spinner=False)
def explanation(model_key: str, image_sha: str, method: str, target: int, layer: str | None, _model, _tensor,
                _turn=contextlib.nullcontext):
    """One method's map; a slow method computes under ``_turn()`` (public mode: the queue), only on a cache miss."""
    with _turn() if METHODS[method].slow else contextlib.nullcontext():
        return evaluation.explain_one(_model, _tensor, method, target, layer)


@st.cache_data(max_entries=64, show_spinner=False)
def faithfulness(model_key: str, image_sha: str, target: int, layer: str | None, names: tuple[str, ...],
                 _model, _tensor, _maps):
    return faithfulness_for(_model, _tensor, _maps, target)


@st.cache_data(max_entries=32, show_spinner=False)
def sanity(model_key: str, image_sha: str, target: int, method: str, layer: str | None, _model, _tensor,
           _turn=contextlib.nullcontext):
    with _turn():
        return evaluation.sanity(_model, _tensor, target, method, layer)


def label(name: str) -> str:
    """A method's label (the random floor of the faithfulness table keeps its name)."""
    return METHODS[name].label if name in METHODS else name


def main() -> None:
    st.title("Compare: attention beside other explanations")
    st.markdown("Attention shows where the model *routes information*; the other methods ask which pixels *change "
                "the score* of a class. Compare them on one image, then test how faithful each map is.")
    handle = pickers.require_model()

    left, right = st.columns([1, 2], gap="large")
    choice, analysis = pickers.image_and_analysis(handle, "compare", left)
    model, classes = handle.model, analysis.classes

    with left:
        st.image(views.enlarge(analysis.image, 256), caption="what the model sees")
    with right:
        st.markdown(controls.prediction_caption(analysis, choice))
        c1, c2 = st.columns(2)
        with c1:
            target = state.persistent(st.selectbox, "Explain the class", "target", options=[-1, *range(len(classes))],
                                      format_func=lambda t: f"predicted: {classes[analysis.predicted]}" if t == -1
                                      else classes[t])
        cam_layers = explain.list_cam_layers(model)
        if st.session_state.get("cam_layer") not in cam_layers:
            with state.guard("Grad-CAM layers"):
                st.session_state["cam_layer"] = explain.default_cam_layer(model)
        with c2:
            cam_layer = state.persistent(st.selectbox, "Grad-CAM layer", "cam_layer", options=cam_layers or [None],
                                         help="Grad-CAM weighs this layer's feature maps by their gradients.")
        attn_layers = list(analysis.trace.attention)
        attn_layer = None
        if len(attn_layers) > 1:
            if st.session_state.get("attn_layer") not in attn_layers:
                st.session_state["attn_layer"] = attn_layers[-1]
            attn_layer = state.persistent(st.selectbox, "Attention layer", "attn_layer", options=attn_layers,
                                          help="Whose attention (received by each position, mean of heads) to compare.")
        alpha, cmap = controls.look_controls()
        whole = controls.whole_photo_toggle(analysis)
    target_idx = analysis.predicted if target == -1 else int(target)
    layer_of = {"grad_cam": cam_layer, "attention": attn_layer}  # the layer of each method that takes one

    st.header(f"Where each method looks for “{classes[target_idx]}”")
    heavy = evaluation.is_heavy(model, handle.meta)
    slow_key = (handle.key, choice.sha, target_idx)
    slow_ok = not heavy or slow_key in st.session_state.setdefault("compare_slow_ok", set())
    if not slow_ok:
        c1, c2 = st.columns([3, 1], vertical_alignment="center")
        c1.info("This model is large for this machine: integrated gradients, occlusion and the faithfulness curves "
                "take minutes here. The quick methods are shown below.")
        if c2.button("Compute the slow ones too", key="compare_slow"):
            st.session_state["compare_slow_ok"].add(slow_key)
            slow_ok = True
    todo = [name for name, m in METHODS.items() if slow_ok or not m.slow]
    turn = state.slow_turn()
    results = {}
    bar = st.progress(0.0, text="Computing explanations…")
    for i, name in enumerate(todo):
        queued = " (a slow one: it waits its turn on this public server)" if METHODS[name].slow and \
            turn is not contextlib.nullcontext else ""
        bar.progress(i / len(todo), text=f"Computing {METHODS[name].label}…{queued}")
        with state.guard(METHODS[name].label):
            results[name] = explanation(handle.key, choice.sha, name, target_idx, layer_of.get(name), model,
                                        analysis.tensor, turn)
    bar.empty()
    found = {n: e.map for n, e in results.items() if e is not None}
    checked = st.session_state.get("sanity_result")
    score_slots = {}  # filled once the deletion/insertion curves are computed, after the maps are on screen

    names = list(METHODS)
    for row in (names[i : i + PER_ROW] for i in range(0, len(names), PER_ROW)):
        for col, name in zip(st.columns(PER_ROW), row):
            e = results.get(name)
            with col:
                st.subheader(METHODS[name].label if name != "attention" or attn_layer is None
                             else f"Attention ({attn_layer})")
                if name not in todo:
                    st.caption("slow for this model: use the button above")
                    continue
                if e is None:
                    st.info(evaluation.not_available(model, analysis.tensor, name, bool(analysis.trace.attention)))
                    continue
                st.image(figures.overlay_view(analysis, maps.normalise(e.map), alpha, cmap, whole), width="stretch")
                layer_note = f" · layer {cam_layer}" if name == "grad_cam" else ""
                st.caption(f"computed in {e.seconds:.2f} s{layer_note} · scaled from min (dark) to max (bright)")
                if e.conservation is not None:
                    st.caption(f"conservation |Σ relevance − logit| / |logit| = {float(e.conservation[0]):.2%}",
                               help="The share of the explained logit that the relevance reaching the input does not add "
                                    "up to: 0 for a fully conservative rule. For AttnLRP it is what the biases, the "
                                    "class token and the position embedding keep.")
                score_slots[name] = st.empty()
                if checked and checked[0] == (handle.key, choice.sha, target_idx, name, layer_of.get(name)):
                    rho, suspicious = checked[1]
                    st.markdown(f"sanity check: final ρ = {rho[-1][1]:.2f} · "
                                + ("**suspicious**: barely changed by random weights" if suspicious else "passed"))

    faith = None
    if slow_ok:
        with state.guard("the faithfulness scores"), st.spinner("Deleting and inserting pixels…"):
            faith = faithfulness(handle.key, choice.sha, target_idx, f"{cam_layer}|{attn_layer}", tuple(found), model,
                                 analysis.tensor, found)
    for name, slot in score_slots.items():
        if faith and name in faith:
            slot.markdown(f"deletion AUC **{faith[name]['deletion_auc']:.3f}** ↓ · insertion AUC "
                          f"**{faith[name]['insertion_auc']:.3f}** ↑ (random map: "
                          f"{faith['random']['deletion_auc']:.3f} / {faith['random']['insertion_auc']:.3f})")

    st.header("How faithful is each map?")
    st.markdown("**Deletion:** blur away the pixels the map ranks highest first; a faithful map makes the class "
                "probability fall fast (**low** area under the curve). **Insertion:** start from the blurred image and "
                "restore those pixels first; the probability should rise fast (**high** area). "
                "A random map is the floor.")
    if not slow_ok:
        st.caption("Computed with the slow methods (button above).")
    if faith:
        table = [{"method": label(n), "deletion AUC ↓": r["deletion_auc"],
                  "insertion AUC ↑": r["insertion_auc"],
                  "time (s)": results[n].seconds if results.get(n) is not None else None}
                 for n, r in faith.items()]
        c1, c2 = st.columns([2, 3])
        c1.dataframe(table, hide_index=True, column_config={
            "deletion AUC ↓": st.column_config.NumberColumn(format="%.3f"),
            "insertion AUC ↑": st.column_config.NumberColumn(format="%.3f"),
            "time (s)": st.column_config.NumberColumn(format="%.2f")})
        with c2:
            controls.show_fig(figures.faithfulness_figure({label(n): r for n, r in faith.items()}),
                              key="compare_faith")

    st.header("Sanity check: does the map depend on what the model learned?")
    st.markdown("The model's layers are re-randomised one by one, from the output down, and the map recomputed. A "
                "map that stays the same (high rank correlation) does not depend on the learned weights: be suspicious "
                "of it (Adebayo et al., 2018). This takes a while.")
    available = [n for n in METHODS if results.get(n) is not None]
    c1, c2 = st.columns([1, 2], vertical_alignment="bottom")
    with c1:
        method = st.selectbox("Method to check", available, format_func=label,
                              key="sanity_method", index=available.index("grad_cam") if "grad_cam" in available else 0)
    if heavy:
        n_layers = sum(1 for _, m in model.named_modules() if any(True for _ in m.parameters(recurse=False)))
        st.caption(f"For this model the check recomputes the map {n_layers} times (once per layer): "
                   "expect many minutes.")
    run_key = (handle.key, choice.sha, target_idx, method, layer_of.get(method))
    if c2.button("Run the sanity check", key="sanity_run", disabled=not available):
        spinner = st.spinner(f"Randomising layers and recomputing {METHODS[method].label}…")
        with state.guard("the sanity check"), spinner:
            st.session_state["sanity_result"] = (run_key, sanity(*run_key, model, analysis.tensor, turn))
            st.rerun()  # show the verdict beside the map above too
    stored = st.session_state.get("sanity_result")
    if stored and stored[0] == run_key:
        rho, suspicious = stored[1]
        if suspicious:
            st.warning(f"{METHODS[method].label}: the map barely changed after randomising the model "
                       f"(final ρ = {rho[-1][1]:.2f}). It may show the image more than the model.")
        else:
            st.success(f"{METHODS[method].label}: the map changed as the weights were randomised "
                       f"(final ρ = {rho[-1][1]:.2f}), as a faithful explanation should.")
        controls.show_fig(figures.sanity_figure(rho, method), key="compare_sanity")



if __name__ == "__main__":  # a fresh server's first request for /compare (see pages/__init__.py)
    from pages import main as dashboard

    dashboard()
