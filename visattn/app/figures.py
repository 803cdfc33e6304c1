"""The dashboard's plotly figures: heatmaps of one map, training curves, faithfulness
curves, confusion matrix, per-class accuracy, per-head statistics, head importance, sanity
checks; and overlays on an enlarged image."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from visattn import plotting
from visattn.app.views import enlarge
from visattn.explain import METHODS

FONT = 16  # readable on a projector


def heatmap_figure(m: np.ndarray, title: str, colorbar: str, cell: tuple[int, int] | None = None,
                   cmap: str = "inferno", height: int = 420, text: bool = False, fmt: str = ".2f"):
    """One (H, W) map as a square plotly heatmap with a titled colour bar; ``cell``
    (row, col) is marked with a cyan x; ``text`` writes each value in its cell."""
    m = np.asarray(m, dtype=np.float64)
    hm = go.Heatmap(z=m, colorscale=plotting.plotly_scale(cmap),
                    colorbar={"title": {"text": colorbar, "side": "right"}},
                    hovertemplate="row %{y}, col %{x}: %{z:" + fmt + "}<extra></extra>")
    if text and m.size <= 256:
        hm.update(text=[[format(v, fmt) for v in row] for row in m], texttemplate="%{text}",
                  textfont={"size": max(9, FONT - m.shape[1])})
    fig = go.Figure(hm)
    if cell is not None:
        fig.add_trace(go.Scatter(x=[cell[1]], y=[cell[0]], mode="markers", showlegend=False, hoverinfo="skip",
                                 marker={"symbol": "x", "size": 16, "color": "cyan", "line": {"width": 2}}))
    fig.update_yaxes(autorange="reversed", scaleanchor="x", title="row", constrain="domain")
    fig.update_xaxes(title="column", constrain="domain")
    fig.update_layout(title=title, height=height, font={"size": FONT}, margin={"l": 10, "r": 10, "t": 50, "b": 10})
    return fig


def curves_figure(steps: list[dict[str, Any]], epochs: list[dict[str, Any]]):
    """Loss (left) and accuracy (right) against the training step, from a metrics file."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    if steps:
        x = [r.get("step") for r in steps]
        fig.add_trace(go.Scatter(x=x, y=[r.get("loss") for r in steps], name="train loss", mode="lines"), 1, 1)
        fig.add_trace(go.Scatter(x=x, y=[r.get("train_acc") for r in steps], name="train accuracy", mode="lines"), 1, 2)
    if epochs:
        # epoch lines at the step where each epoch ended (steps per epoch from the step lines)
        per_epoch = (steps[-1].get("step", 0) / max(steps[-1].get("epoch", 1), 1)) if steps else 1
        x = [r.get("epoch", 0) * per_epoch for r in epochs]
        if not steps:  # too few steps for step lines: plot the epoch lines alone
            fig.add_trace(go.Scatter(x=x, y=[r.get("loss") for r in epochs], name="train loss (epoch)",
                                     mode="lines+markers"), 1, 1)
            fig.add_trace(go.Scatter(x=x, y=[r.get("train_acc") for r in epochs], name="train accuracy (epoch)",
                                     mode="lines+markers"), 1, 2)
        fig.add_trace(go.Scatter(x=x, y=[r.get("test_acc") for r in epochs], name="test accuracy (end of epoch)",
                                 mode="lines+markers", marker={"size": 10}), 1, 2)
    fig.update_xaxes(title="step" if steps else "epoch")
    fig.update_yaxes(title="cross-entropy", row=1, col=1)
    fig.update_yaxes(title="accuracy", range=[0, 1], row=1, col=2)
    fig.update_layout(height=380, font={"size": FONT - 2}, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      legend={"orientation": "h", "y": -0.25})
    return fig


def faithfulness_figure(results: dict[str, dict[str, Any]]):
    """Deletion (left) and insertion (right) curves, one line per method, AUCs in the legend."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("deletion (lower is better)", "insertion (higher is better)"))
    for i, (name, r) in enumerate(results.items()):
        colour = f"hsl({int(360 * i / max(len(results), 1))},70%,45%)"
        label = f"{name} (AUC {r.get('deletion_auc', float('nan')):.2f} / {r.get('insertion_auc', float('nan')):.2f})"
        for col, kind in ((1, "deletion"), (2, "insertion")):
            curve = r.get(f"{kind}_curve") or []
            xs = r.get("fractions") or list(np.linspace(0, 1, len(curve)))
            fig.add_trace(go.Scatter(x=xs, y=curve, mode="lines", line={"color": colour}, legendgroup=name,
                                     showlegend=col == 1, name=label), 1, col)
    fig.update_xaxes(title="fraction of pixels removed", range=[0, 1], row=1, col=1)
    fig.update_xaxes(title="fraction of pixels restored", range=[0, 1], row=1, col=2)
    fig.update_yaxes(title="probability of the class", row=1, col=1)
    fig.update_layout(height=520, font={"size": FONT - 2}, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      legend={"orientation": "h", "y": -0.2})
    return fig


def confusion_figure(confusion: np.ndarray, classes: Sequence[str]):
    """Confusion matrix heatmap: rows true class, columns predicted class, counts written in."""
    c = np.asarray(confusion)
    fig = go.Figure(go.Heatmap(z=c, x=list(classes), y=list(classes), colorscale="Blues", text=c,
                               texttemplate="%{text}", colorbar={"title": {"text": "images", "side": "right"}},
                               hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title="true class")
    fig.update_xaxes(title="predicted class", side="bottom")
    fig.update_layout(height=560, font={"size": FONT - 2}, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                      title="confusion matrix")
    return fig


def per_class_figure(per_class: np.ndarray, classes: Sequence[str]):
    p = np.asarray(per_class, dtype=np.float64) * 100
    fig = go.Figure(go.Bar(x=list(classes), y=p, text=[f"{v:.0f}%" for v in p], textposition="auto"))
    fig.update_layout(title="accuracy per class", yaxis={"title": "accuracy (%)", "range": [0, 100]}, height=360,
                      font={"size": FONT - 2}, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig


def head_stats_figure(stats: dict[str, dict[str, np.ndarray]]):
    """Per-head entropy (left) and mean attention distance (right) by layer, one marker per head."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("entropy (nats): high = spread out",
                                                        "mean attention distance (pixels)"))
    layers = list(stats)
    heads = max((len(s["entropy"]) for s in stats.values()), default=0)
    for h in range(heads):
        xs = [lay for lay in layers if h < len(stats[lay]["entropy"])]
        for col, key in ((1, "entropy"), (2, "distance")):
            fig.add_trace(go.Scatter(x=xs, y=[float(stats[lay][key][h]) for lay in xs], mode="markers",
                                     marker={"size": 12}, name=f"head {h}", legendgroup=f"h{h}",
                                     showlegend=col == 1), 1, col)
    fig.add_trace(go.Scatter(x=layers, y=[float(stats[lay]["max_entropy"]) for lay in layers], mode="lines",
                             line={"dash": "dash", "color": "gray"}, name="uniform attention"), 1, 1)
    fig.update_xaxes(title="layer")
    fig.update_layout(height=400, font={"size": FONT - 2}, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig


def head_importance_figure(effects, class_name: str, b: int = 0):
    """Layers × heads heatmap of the change of one image's target probability (percentage
    points) when each head is ablated alone (``visattn.ablation.head_importance``); blue: the
    head was helping the prediction."""
    z = effects.prob[b] * 100.0  # (layers, max heads), NaN where a layer has fewer heads
    limit = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = go.Figure(go.Heatmap(
        z=z.tolist(), x=[f"head {h}" for h in range(z.shape[1])], y=effects.layers, zmid=0.0, zmin=-limit,
        zmax=limit, colorscale="RdBu", text=np.round(z, 1).tolist(), texttemplate="%{text:+.1f}",
        colorbar={"title": {"text": "Δ p (points)", "side": "right"}},
        hovertemplate="%{y} · %{x}: %{z:+.2f} points<extra></extra>"))
    fig.update_layout(title=f"Δ probability of '{class_name}' with each head ablated alone",
                      yaxis={"autorange": "reversed"}, height=140 + 40 * len(effects.layers), font={"size": FONT},
                      margin={"l": 10, "r": 10, "t": 50, "b": 10})
    return fig


def sanity_figure(rho: list[tuple[str, float]], method: str):
    fig = go.Figure(go.Scatter(x=[n for n, _ in rho], y=[r for _, r in rho], mode="lines+markers",
                               marker={"size": 10}, name=method))
    fig.add_hline(y=0.5, line_dash="dash", line_color="gray", annotation_text="suspicious above 0.5")
    fig.update_layout(title=f"{(METHODS[method].label if method in METHODS else method)}: similarity to the original map as layers are "
                            "randomised (output first)", yaxis={"title": "Spearman rank correlation",
                                                               "range": [-1, 1.05]},
                      xaxis={"title": "randomised down to layer"}, height=380, font={"size": FONT - 2},
                      margin={"l": 10, "r": 10, "t": 50, "b": 10})
    return fig


def overlay_large(image: np.ndarray, map2d: np.ndarray, alpha: float = 0.5, cmap: str = "inferno",
                  size: int = 256, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """``plotting.overlay`` on the image enlarged to ``size`` px (the map upsampled
    smoothly, the pixels kept sharp), for display."""
    return plotting.overlay(enlarge(image, size), map2d, alpha, cmap, vmin, vmax)

