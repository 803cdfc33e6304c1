"""Compare: attention maps beside gradient and perturbation explanations, and how
faithful each one is (deletion/insertion) and whether it depends on the weights (sanity)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # run directly (tests) rather than through dashboard.py
    sys.path.insert(0, ROOT)

import streamlit as st  # noqa: E402

from pages import _shared as ui  # noqa: E402
from visattn import evaluation, figures, views  # noqa: E402
from visattn import explain, maps  # noqa: E402

METHODS = list(evaluation.METHOD_LABELS)


@st.cache_data(max_entries=256, show_spinner=False)
def explanation(model_key: str, image_sha: str, method: str, target: int, layer: str | None, _model, _tensor):
    return evaluation.explain_one(_model, _tensor, method, target, layer)


@st.cache_data(max_entries=64, show_spinner=False)
def faithfulness(model_key: str, image_sha: str, target: int, layer: str | None, names: tuple[str, ...],
                 _model, _tensor, _maps):
    return evaluation.faithfulness_for(_model, _tensor, _maps, target)


@st.cache_data(max_entries=32, show_spinner=False)
def sanity(model_key: str, image_sha: str, target: int, method: str, layer: str | None, _model, _tensor):
    return evaluation.sanity(_model, _tensor, target, method, layer)


def main() -> None:
    st.title("Compare: attention beside other explanations")
    st.markdown("Attention shows where the model *routes information*; the other methods ask which pixels *change "
                "the score* of a class. Compare them on one image, then test how faithful each map is.")
    handle = ui.require_model()

    left, right = st.columns([1, 2], gap="large")
    choice, analysis = ui.image_and_analysis(handle, "compare", left)
    model, classes = handle.model, analysis.classes

    with left:
        st.image(views.enlarge(analysis.image, 256), caption="what the model sees")
    with right:
        st.markdown(ui.prediction_caption(analysis, choice))
        c1, c2 = st.columns(2)
        with c1:
            target = ui.persistent(st.selectbox, "Explain the class", "target", options=[-1, *range(len(classes))],
                                   format_func=lambda t: f"predicted: {classes[analysis.predicted]}" if t == -1
                                   else classes[t])
        cam_layers = explain.list_cam_layers(model)
        if st.session_state.get("cam_layer") not in cam_layers:
            with ui.guard("Grad-CAM layers"):
                st.session_state["cam_layer"] = explain.default_cam_layer(model)
        with c2:
            cam_layer = ui.persistent(st.selectbox, "Grad-CAM layer", "cam_layer", options=cam_layers or [None],
                                      help="Grad-CAM weighs this layer's feature maps by their gradients.")
        attn_layers = list(analysis.trace.attention)
        attn_layer = None
        if len(attn_layers) > 1:
            if st.session_state.get("attn_layer") not in attn_layers:
                st.session_state["attn_layer"] = attn_layers[-1]
            attn_layer = ui.persistent(st.selectbox, "Attention layer", "attn_layer", options=attn_layers,
                                       help="Whose attention (received by each position, mean of heads) to compare.")
        alpha, cmap = ui.look_controls()
    target_idx = analysis.predicted if target == -1 else int(target)
    layer_of = {"grad_cam": cam_layer, "attention": attn_layer}  # the methods that take a layer

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
    todo = [m for m in METHODS if slow_ok or m not in evaluation.SLOW_METHODS]
    results = {}
    bar = st.progress(0.0, text="Computing explanations…")
    for i, name in enumerate(todo):
        bar.progress(i / len(todo), text=f"Computing {evaluation.METHOD_LABELS[name]}…")
        with ui.guard(evaluation.METHOD_LABELS[name]):
            results[name] = explanation(handle.key, choice.sha, name, target_idx, layer_of.get(name), model,
                                        analysis.tensor)
    bar.empty()
    found = {n: e.map for n, e in results.items() if e is not None}
    checked = st.session_state.get("sanity_result")
    score_slots = {}  # filled once the deletion/insertion curves are computed, after the maps are on screen

    for row in (METHODS[:3], METHODS[3:]):
        for col, name in zip(st.columns(3), row):
            e = results.get(name)
            with col:
                st.subheader(evaluation.METHOD_LABELS[name] if name != "attention" or attn_layer is None
                             else f"Attention ({attn_layer})")
                if name not in todo:
                    st.caption("slow for this model: use the button above")
                    continue
                if e is None:
                    st.info("Not available: this model has no self-attention layers."
                            if name in ("attention", "rollout")
                            else "Could not be computed (see the message above).")
                    continue
                st.image(figures.overlay_large(analysis.image, maps.normalise(e.map), alpha, cmap), width="stretch")
                layer_note = f" · layer {cam_layer}" if name == "grad_cam" else ""
                st.caption(f"computed in {e.seconds:.2f} s{layer_note} · scaled from min (dark) to max (bright)")
                score_slots[name] = st.empty()
                if checked and checked[0][:4] == (handle.key, choice.sha, target_idx, name):
                    rho, suspicious = checked[1]
                    st.markdown(f"sanity check: final ρ = {rho[-1][1]:.2f} · "
                                + ("**suspicious**: barely changed by random weights" if suspicious else "passed"))

    faith = None
    if slow_ok:
        with ui.guard("the faithfulness scores"), st.spinner("Deleting and inserting pixels…"):
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
        table = [{"method": evaluation.METHOD_LABELS.get(n, n), "deletion AUC ↓": r["deletion_auc"],
                  "insertion AUC ↑": r["insertion_auc"],
                  "time (s)": results[n].seconds if results.get(n) is not None else None}
                 for n, r in faith.items()]
        c1, c2 = st.columns([2, 3])
        c1.dataframe(table, hide_index=True, column_config={
            "deletion AUC ↓": st.column_config.NumberColumn(format="%.3f"),
            "insertion AUC ↑": st.column_config.NumberColumn(format="%.3f"),
            "time (s)": st.column_config.NumberColumn(format="%.2f")})
        with c2:
            ui.show_fig(figures.faithfulness_figure({evaluation.METHOD_LABELS.get(n, n): r for n, r in faith.items()}),
                        key="compare_faith")

    st.header("Sanity check: does the map depend on what the model learned?")
    st.markdown("The model's layers are re-randomised one by one, from the output down, and the map recomputed. A "
                "map that stays the same (high rank correlation) does not depend on the learned weights: be suspicious "
                "of it (Adebayo et al., 2018). This takes a while.")
    available = [n for n in METHODS if results.get(n) is not None]
    c1, c2 = st.columns([1, 2], vertical_alignment="bottom")
    with c1:
        method = st.selectbox("Method to check", available, format_func=evaluation.METHOD_LABELS.get,
                              key="sanity_method", index=available.index("grad_cam") if "grad_cam" in available else 0)
    if heavy:
        n_layers = sum(1 for _, m in model.named_modules() if any(True for _ in m.parameters(recurse=False)))
        st.caption(f"For this model the check recomputes the map {n_layers} times (once per layer): "
                   "expect many minutes.")
    run_key = (handle.key, choice.sha, target_idx, method, layer_of.get(method))
    if c2.button("Run the sanity check", key="sanity_run", disabled=not available):
        spinner = st.spinner(f"Randomising layers and recomputing {evaluation.METHOD_LABELS[method]}…")
        with ui.guard("the sanity check"), spinner:
            st.session_state["sanity_result"] = (run_key, sanity(*run_key, model, analysis.tensor))
            st.rerun()  # show the verdict beside the map above too
    stored = st.session_state.get("sanity_result")
    if stored and stored[0] == run_key:
        rho, suspicious = stored[1]
        if suspicious:
            st.warning(f"{evaluation.METHOD_LABELS[method]}: the map barely changed after randomising the model "
                       f"(final ρ = {rho[-1][1]:.2f}). It may show the image more than the model.")
        else:
            st.success(f"{evaluation.METHOD_LABELS[method]}: the map changed as the weights were randomised "
                       f"(final ρ = {rho[-1][1]:.2f}), as a faithful explanation should.")
        ui.show_fig(figures.sanity_figure(rho, method), key="compare_sanity")


ui.page_start()
ui.run(main)
