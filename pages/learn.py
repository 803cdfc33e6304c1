"""Learn: self-attention step by step, with the chosen model's real numbers (for a classroom)."""
from __future__ import annotations

import numpy as np
import streamlit as st

from pages import _controls as controls, _pickers as pickers, _state as state
from visattn import plotting
from visattn.app import figures, views
from visattn.app.lesson import SCALES, breaks_line, key_name, lesson, next_layer, positions_text
from visattn.breaking import broken
from visattn.positions import position_encodings

SHOWN = 8  # numbers of each vector shown


def first(v: np.ndarray | None, n: int = SHOWN) -> list[float | None]:
    if v is None:
        return [None] * n
    return [float(x) for x in np.asarray(v)[:n]] + [None] * max(0, n - len(v))


def big(text: str) -> None:
    st.markdown(f"<div style='font-size:1.3rem;line-height:1.6'>{text}</div>", unsafe_allow_html=True)


def heatmap_beside(les, values: np.ndarray, title: str, colorbar: str, fmt: str, key: str):
    """A large heatmap of one number per position (each written in its cell) on the left;
    returns the right-hand column, for the table that goes beside it."""
    left, right = st.columns([3, 2])
    with left:
        controls.show_fig(figures.heatmap_figure(les.to_grid(values), title, colorbar, les.cell, st.session_state["cmap"],
                                                 height=480, text=True, fmt=fmt), key=key)
    return right


def broken_trace(handle, choice, analysis, scale: float, sqrt_d: bool, positions: bool,
                 heads: dict[str, list[int]]):
    """The model's capture on this image with those breaks (kept in the analyses' byte-bounded cache)."""
    key = (handle.key, choice.sha, "broken", scale, sqrt_d, positions, tuple(sorted((k, tuple(v)) for k, v in heads.items())))
    x = analysis.tensor.to(next(handle.model.parameters()).device)
    return pickers.analyses().get(key, lambda: broken(handle.model, x, scale=scale, sqrt_d=sqrt_d,
                                                      positions=positions, heads=heads),
                                  size=lambda t: t.nbytes)


def break_it(handle, choice, analysis, les, layer: str) -> None:
    """Step 6: the real model run again with its attention broken, beside the unbroken one."""
    st.header("Step 6 · Break it: what does each part do for the prediction?")
    big("Now change one part of attention and run the <b>real model</b> again on your image: the prediction and "
        f"the attention of your position (layer <b>{layer}</b>, head <b>{les.head}</b>) are shown beside the "
        "unbroken model's.")
    c1, c2, c3 = st.columns(3, gap="large")
    with c1:
        scale = state.persistent(st.select_slider, "Multiply the scores by", "break_scale", SCALES,
                                 format_func=lambda v: f"×{v:g}", help="The scores go to the softmax multiplied by "
                                 "this factor: larger makes the weights sharper (the softmax temperature is "
                                 "1 / factor), smaller makes them flatter.")
        sqrt_d = not state.persistent(st.checkbox, "Do not divide by √d_k", "break_sqrt_d",
                                      help="Dot-product layers only; a cosine layer keeps its learned temperature.")
        if not sqrt_d and all(site.similarity == "cosine" for site in analysis.trace.attention.values()):
            st.caption("Every attention layer of this model compares by cosine similarity, with a learned "
                       "temperature: there is no √d_k to leave out.")
    found = position_encodings(handle.model)
    with c2:
        positions = not state.persistent(st.toggle, "Position encoding off", "break_positions")
        st.caption(positions_text(found, handle.meta.get("model", "This model")))
    options = [(name, h) for name, site in analysis.trace.attention.items() for h in range(site.heads)]
    with c3:
        hkey = f"break_heads_{handle.key}"  # one choice per model: its heads are its own
        st.session_state[hkey] = [o for o in st.session_state.get(hkey, []) if o in options]
        off = state.persistent(st.multiselect, "Remove heads", hkey, options, value_arg="default",
                               format_func=lambda o: f"{o[0]} · head {o[1]}",
                               help="Their output (weights @ V) becomes zero.")
    heads = views.head_spec(off)
    what = breaks_line(scale, sqrt_d, positions, heads)
    if not what:
        st.caption("Nothing is broken yet: move the slider, switch the positions off or remove a head.")
        return
    with state.guard("the broken model"), st.spinner("Running the broken model…"):
        trace = broken_trace(handle, choice, analysis, scale, sqrt_d, positions, heads)
        probs = trace.logits[0].float().softmax(-1).cpu().numpy()
        k = min(5, len(analysis.classes))
        row = les.to_grid(trace.attention[layer].row(0, les.token)[les.head].float().cpu().numpy())
        unbroken = les.to_grid(les.layer_weights)
        top = max(float(row.max()), float(unbroken.max()))
        before, after = analysis.classes[analysis.predicted], analysis.classes[int(probs.argmax())]
        big(f"Prediction: <b>{before}</b> ({analysis.probs.max():.1%}) → <b>{after}</b> ({probs.max():.1%})"
            + (" — changed!" if before != after else "") + f" &nbsp; <small>({what})</small>")
        left, right = st.columns(2)
        for column, side, p, title, weights in ((left, "before", analysis.probs, "unbroken", unbroken),
                                                (right, "after", probs, "broken", row)):
            with column:
                fig = plotting.topk_bar_figure(analysis.classes, p, k=k)
                fig.update_layout(title=f"top-{k}, {title}")
                controls.show_fig(fig, key=f"break_topk_{side}")
                controls.show_fig(figures.heatmap_figure(weights, f"attention weights, {title}", "weight", les.cell,
                                                         st.session_state["cmap"], height=400, zmin=0.0, zmax=top),
                                  key=f"break_map_{side}")
        st.caption(f"Largest weight of your position: {unbroken.max():.3f} unbroken, {row.max():.3f} broken "
                   "(one colour scale for both maps).")


def main() -> None:
    st.title("Learn: how self-attention works, step by step")
    big("Every position of the image asks a <b>question</b> (its query <b>Q</b>), offers a <b>label</b> (its key "
        "<b>K</b>) and carries some <b>content</b> (its value <b>V</b>). A position looks at the others whose labels "
        "match its question, and mixes in their content. Below, every number comes from the model you picked, "
        "on your image.")
    st.latex(r"\text{Attention}(Q, K, V) = \operatorname{softmax}\!\left(\frac{Q K^\top}{\sqrt{d_k}}\right) V"
             r"\qquad\quad \text{output} = \text{input} + g \cdot \text{Attention}(Q, K, V)\,W_O")

    handle = pickers.require_model()
    left, right = st.columns([1, 1], gap="large")
    choice, analysis = pickers.image_and_analysis(handle, "learn", left)
    sites = analysis.trace.attention
    if not sites and analysis.trace.skipped:
        st.info("No attention layer of this model could be captured (named above), so its queries, keys and values "
                "cannot be shown step by step.")
        st.stop()
    if not sites:
        other = analysis.trace.channel or analysis.trace.spatial
        st.info(f"{handle.meta.get('model', 'This model')} has no self-attention layers, so there are no queries, keys "
                "and values to show. "
                + ("It uses other kinds of attention: squeeze-and-excitation (SE) weighs whole channels and "
                   "CBAM weighs image regions; see them on the Explore page. " if other else "")
                + "To follow these steps, pick a model with self-attention (sa_cnn, hybrid_vit or a ViT) "
                  "in the sidebar.")
        st.stop()

    with right:
        st.markdown(controls.prediction_caption(analysis, choice))
        layer, head = controls.layer_head_selectors(analysis.trace)
        if head is None:
            st.caption("The steps follow one head at a time: showing head 0.")
            head = 0
        nxt = next_layer(analysis.trace, layer)

        def go_next() -> None:
            if nxt:
                st.session_state["layer"] = nxt

    site = sites[layer]

    st.header("Pick a position")
    c1, c2 = st.columns([1, 1], gap="large")
    with c1:
        yx = controls.query_picker(analysis.image, site.grid, key="learn", size=400)
    token = views.query_token(site, yx)
    les = lesson(site, token, head)
    where = "the extra (CLS) token" if les.cell is None else f"row {les.cell[0]}, column {les.cell[1]}"
    with c2:
        big(f"Layer <b>{layer}</b> works on a <b>{site.grid[0]}×{site.grid[1]}</b> grid of positions "
            f"({site.q.shape[2]} in all). You picked the cell at <b>{where}</b> (the cyan square). Click another "
            "point of the picture, or move the sliders, to follow a different position.")

    st.header("Step 1 · Each position makes a query, a key and a value")
    big(f"The layer multiplies what it knows about each position by three learned matrices. For head {head} each "
        f"vector has <b>{les.d_k}</b> numbers; here are the first {min(SHOWN, les.d_k)} at your position.")
    st.dataframe({"number": [f"#{i}" for i in range(SHOWN)], "query Q (the question)": first(les.q),
                  "key K (the label)": first(les.k), "value V (the content)": first(les.v)},
                 hide_index=True, width="stretch")

    st.header("Step 2 · Compare the query with every key: the scores Q·Kᵀ")
    big("Multiply the query with each key number by number and add up: a <b>dot product</b>. A big score means "
        "that key answers the question well.")
    with heatmap_beside(les, les.dot, "score q·k for every position", "q·k", ".1f", key="learn_scores"):
        order = np.argsort(-les.dot)[:5]
        st.dataframe({"position": [key_name(site, int(j)) for j in order],
                      "score q·k": [float(les.dot[j]) for j in order]}, hide_index=True, width="stretch")
        st.caption("The five highest scores.")

    st.header("Step 3 · Scale, then softmax: the attention weights")
    if les.similarity == "cosine":
        scaled = (f"This layer compares by <b>cosine similarity</b> (the dot product of the vectors made unit-length, "
                  f"between −1 and 1) and multiplies by a learned temperature, <b>{les.scale:.2f}</b>.")
    else:
        scaled = (f"Divide every score by √d_k = √{les.d_k} = <b>{np.sqrt(les.d_k):.2f}</b>, "
                  "so the scores do not grow "
                  "with the vector length.")
    if les.bias is not None:
        scaled += " It also adds a learned bonus for each relative offset (relative position bias)."
    big(scaled + " Then <b>softmax</b> turns the scores into weights: all positive, adding up to exactly 1.")
    with heatmap_beside(les, les.weights, "attention weights", "weight", ".2f", key="learn_weights"):
        st.dataframe({"key position": [t[1] for t in les.top], "weight": [t[2] for t in les.top]},
                     hide_index=True, width="stretch",
                     column_config={"weight": st.column_config.ProgressColumn(format="%.3f", min_value=0.0,
                                                                              max_value=1.0)})
        st.metric("Sum of all the weights", f"{les.sum_weights:.6f}")
        st.caption(f"Largest difference from the weights the layer really used: {les.weights_error:.1e}")

    st.header("Step 4 · Mix the values: the weighted sum")
    big("Add up every position's value V, each multiplied by its weight. Positions with big weights contribute most. "
        "The heads' results are put side by side and mixed by one more matrix, W<sub>O</sub>: that is the "
        "<b>context vector</b>, what this position learned from the others.")
    data = {"number": [f"#{i}" for i in range(SHOWN)], f"head {head}: Σ weight × V": first(les.head_context)}
    if les.context is not None:
        data["context vector (all heads, after W_O)"] = first(les.context)
    st.dataframe(data, hide_index=True, width="stretch")
    st.caption(f"Checked against the layer's own computation: largest difference {les.head_context_check:.1e}.")

    st.header("Step 5 · Add it back to the input")
    if les.outputs is not None:
        big("The context is added to what the position already knew, through a learned gate "
            f"g = <b>{les.gate:.3f}</b>: "
            "<b>output = input + g · context</b>. The input is kept; attention only adds to it.")
        st.dataframe({"number": [f"#{i}" for i in range(SHOWN)], "input": first(les.inputs),
                      "g · context": first(None if les.context is None else les.gate * les.context),
                      "input + g · context": first(les.inputs + les.gate * les.context),
                      "output (recorded)": first(les.outputs)}, hide_index=True, width="stretch")
        st.metric("Largest difference between input + g·context and the real output", f"{les.residual_error:.1e}",
                  help="Over all channels at this position: zero up to rounding.")
    else:
        st.info("This model adds the context back to its input outside the attention module (in the transformer "
                "block), so that sum was not recorded. The input and the context vector are below.")
        if les.inputs is not None:
            st.dataframe({"number": [f"#{i}" for i in range(SHOWN)], "input": first(les.inputs),
                          "context": first(les.context)}, hide_index=True, width="stretch")

    st.subheader("→ Next layer")
    if nxt:
        big(f"The output of every position becomes the input of the next attention layer, <b>{nxt}</b>, which "
            "repeats the five steps.")
        st.button(f"Go to layer {nxt}", on_click=go_next, key="learn_next")
    else:
        big("This is the last attention layer: its output goes on to the rest of the network and the classifier.")

    st.header("Dot product or cosine similarity?")
    big("Both compare the query with the keys. The <b>dot product</b> also grows with the length of the vectors; "
        "the <b>cosine</b> only measures their direction, between −1 and 1. "
        f"This layer uses the <b>{'cosine' if les.similarity == 'cosine' else 'dot product'}</b>.")
    c1, c2 = st.columns(2)
    with c1:
        controls.show_fig(figures.heatmap_figure(les.to_grid(les.dot), "dot product q·k", "q·k", les.cell,
                                                 st.session_state["cmap"],
                                                 height=440), key="learn_dot")
    with c2:
        controls.show_fig(figures.heatmap_figure(les.to_grid(les.cosine), "cosine similarity cos(q, k)", "cos(q, k)",
                                                 les.cell, st.session_state["cmap"], height=440), key="learn_cos")
    st.latex(r"q \cdot k = \sum_i q_i k_i \qquad\qquad \cos(q, k) = \frac{q \cdot k}{\lVert q \rVert\,\lVert k \rVert}")

    break_it(handle, choice, analysis, les, layer)


if __name__ == "__main__":  # a fresh server's first request for /learn (see pages/__init__.py)
    from pages import main as dashboard

    dashboard()
