"""The dashboard's plotly figures: heatmaps of one map, training curves, faithfulness
curves, confusion matrix, per-class accuracy, per-head statistics, head importance, sanity
checks; and overlays on an enlarged image."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go
from PIL import Image
from plotly.subplots import make_subplots

from visattn import plotting
from visattn.app.views import enlarge
from visattn.explain import METHODS

FONT = 16  # readable on a projector


def heatmap_figure(m: np.ndarray, title: str, colorbar: str, cell: tuple[int, int] | None = None,
                   cmap: str = "inferno", height: int = 420, text: bool = False, fmt: str = ".2f",
                   zmin: float | None = None, zmax: float | None = None):
    """One (H, W) map as a square plotly heatmap with a titled colour bar; ``cell``
    (row, col) is marked with a cyan x; ``text`` writes each value in its cell; ``zmin``,
    ``zmax`` fix the colour range (to compare two maps), else it is the map's own."""
    m = np.asarray(m, dtype=np.float64)
    hm = go.Heatmap(z=m, colorscale=plotting.plotly_scale(cmap), zmin=zmin, zmax=zmax,
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


def runs_figure(records: dict[str, Any]):
    """Training runs overlaid, one colour each, against the fraction of training done: the
    training loss (left); accuracy (middle: training as a dotted line, test at the end of
    each epoch as markers); the probe's mean attention entropy in the last attention layer
    (right), with uniform attention's log N dashed. ``records``: ``{label: runs.RunRecord}``."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=("loss", "accuracy", "attention entropy (last layer)"))
    uniform = None
    for i, (label, r) in enumerate(records.items()):
        colour = f"hsl({int(360 * i / max(len(records), 1))},70%,45%)"
        total = next((x["total_steps"] for x in r.steps + r.epochs if x.get("total_steps")), 0) or 1

        def done(rows: list[dict[str, Any]]) -> list[float]:
            return [x.get("step", x.get("epoch", 0) * total / max(x.get("epochs", 1), 1)) / total for x in rows]

        def line(rows, y, col, **kw) -> None:
            fig.add_trace(go.Scatter(x=done(rows), y=y, legendgroup=label, line={"color": colour}, **kw), 1, col)

        trained = [x for x in r.steps if "loss" in x] or r.epochs
        line(trained, [x["loss"] for x in trained], 1, name=label, mode="lines")
        line(trained, [x.get("train_acc") for x in trained], 2, name=f"{label}: training", mode="lines",
             line_dash="dot", showlegend=False)
        line(r.epochs, [x.get("test_acc") for x in r.epochs], 2, name=f"{label}: test", mode="lines+markers",
             marker={"size": 10}, showlegend=False)
        entropy = r.entropy()
        if entropy:
            steps, values, uniform = entropy[list(entropy)[-1]]
            fig.add_trace(go.Scatter(x=[s / total for s in steps], y=values, legendgroup=label, showlegend=False,
                                     line={"color": colour}, mode="lines+markers", name=f"{label}: entropy"), 1, 3)
    if uniform is not None:
        fig.add_hline(y=uniform, line_dash="dash", line_color="grey", annotation_text="uniform (log N)", row=1, col=3)
    fig.update_xaxes(title="fraction of training", range=[0, 1.02])
    fig.update_yaxes(title="cross-entropy", row=1, col=1)
    fig.update_yaxes(title="accuracy (test: markers)", range=[0, 1], row=1, col=2)
    fig.update_yaxes(title="nats", row=1, col=3)
    fig.update_layout(height=400, font={"size": FONT - 2}, margin={"l": 10, "r": 10, "t": 40, "b": 10},
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


def _head_heatmap(z: np.ndarray, layers: list[str], title: str, unit: str, colorbar: str):
    """Layers × heads heatmap centred on zero (blue above, red below), NaN where a layer has fewer heads."""
    limit = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = go.Figure(go.Heatmap(
        z=z.tolist(), x=[f"head {h}" for h in range(z.shape[1])], y=layers, zmid=0.0, zmin=-limit,
        zmax=limit, colorscale="RdBu", text=np.round(z, 1).tolist(), texttemplate="%{text:+.1f}",
        colorbar={"title": {"text": colorbar, "side": "right"}},
        hovertemplate=f"%{{y}} · %{{x}}: %{{z:+.2f}} {unit}<extra></extra>"))
    fig.update_layout(title=title, yaxis={"autorange": "reversed"}, height=140 + 40 * len(layers),
                      font={"size": FONT}, margin={"l": 10, "r": 10, "t": 50, "b": 10})
    return fig


def head_importance_figure(effects, class_name: str, b: int = 0):
    """Layers × heads heatmap of the change of one image's target probability (percentage
    points) when each head is ablated alone (``visattn.ablation.head_importance``); blue: the
    head was helping the prediction."""
    return _head_heatmap(effects.prob[b] * 100.0, effects.layers,
                         f"Δ probability of '{class_name}' with each head ablated alone", "points", "Δ p (points)")


def patching_figure(effects, b: int = 0):
    """Layers × heads heatmap of the share (%) of the clean-minus-corrupted logit difference
    each head restores when its clean output is patched into the corrupted run
    (``visattn.ablation.patching_effects``)."""
    return _head_heatmap(effects.logit[b] * 100.0, effects.layers,
                         "Logit difference restored by patching each head's clean output into the corrupted run",
                         "%", "restored (%)")


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



def crop_is_whole(analysis) -> bool:
    """Whether the model saw the whole photo (no crop to place), or the photo is not known."""
    photo, box = analysis.photo, analysis.box
    if photo is None or box is None:
        return True
    return box[2] - box[0] >= photo.shape[1] - 1 and box[3] - box[1] >= photo.shape[0] - 1


def overlay_view(analysis, map2d: np.ndarray, alpha: float = 0.5, cmap: str = "inferno", whole_photo: bool = True,
                 size: int = 256, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """A map of an :class:`visattn.inference.Analysis` for display: over the whole photo
    (the model's crop placed where it came from, ``plotting.overlay_on_photo``; a photo
    smaller than ``size`` px is enlarged to it), or, when ``whole_photo`` is off or the model
    saw the whole photo, over the model's input enlarged to ``size`` px (:func:`overlay_large`)."""
    if not whole_photo or crop_is_whole(analysis):
        return overlay_large(analysis.image, map2d, alpha, cmap, size, vmin, vmax)
    photo, box = analysis.photo, analysis.box
    scale = size / max(photo.shape[:2])
    if scale > 1:
        h, w = round(photo.shape[0] * scale), round(photo.shape[1] * scale)
        photo = np.asarray(Image.fromarray(photo).resize((w, h), Image.Resampling.NEAREST))
        box = tuple(v * scale for v in box)
    return plotting.overlay_on_photo(photo, map2d, box, alpha, cmap, vmin, vmax)
