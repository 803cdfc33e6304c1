"""Figures of attention maps: matplotlib overlays (for PNG export) and plotly charts.

No pyplot: matplotlib figures are plain :class:`matplotlib.figure.Figure` objects,
free of pyplot's global state, so concurrent sessions cannot draw into each other.
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib
import numpy as np
import plotly.graph_objects as go
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from plotly.subplots import make_subplots

from visattn import panels
from visattn.maps import upsample

#: Colour-scale titles of the similarity panels, in display order.
SIMILARITY_LABELS = {
    "attention": "attention weight",
    "dot": "q·k (raw)",
    "cosine": "cos(q, k)",
    "softmax": "softmax(q·k/√d_k)",
}
_MARKER = {"color": "cyan", "size": 12}


def _rgb(image: np.ndarray) -> np.ndarray:
    """Validate an (H, W, 3) image and return it as float32 in [0, 1]."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    return img.astype(np.float32) / 255.0


def plotly_scale(cmap: str, n: int = 11) -> list[list]:
    """A matplotlib colormap sampled as a plotly colour scale of ``rgb(r,g,b)`` strings.

    (plotly.js in the browser misreads hex strings such as inferno's ``#000004`` and
    paints the low end of the scale pink.)
    """
    cm = matplotlib.colormaps[cmap]
    return [[i / (n - 1), "rgb({},{},{})".format(*(round(255 * c) for c in cm(i / (n - 1))[:3]))] for i in range(n)]


def overlay(
    image: np.ndarray,
    map2d: np.ndarray,
    alpha: float = 0.5,
    cmap: str = "inferno",
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Blend a colormapped token map, upsampled to the image, over an (H, W, 3) image.

    The map is scaled from ``vmin`` to ``vmax`` (default: its own min and max).

    >>> overlay(np.zeros((64, 64, 3), np.uint8), np.eye(8)).shape
    (64, 64, 3)
    """
    img = _rgb(image)
    m = upsample(map2d, img.shape[:2])
    return panels.blend(np.asarray(image, dtype=np.uint8), panels.colourise(m, cmap, vmin, vmax), alpha)


def overlay_on_photo(
    photo: np.ndarray,
    map2d: np.ndarray,
    box: Sequence[float],
    alpha: float = 0.5,
    cmap: str = "inferno",
    vmin: float | None = None,
    vmax: float | None = None,
    dim: float = 0.45,
) -> np.ndarray:
    """:func:`overlay` placed on the whole photo: the map covers ``box`` (left, top, right,
    bottom in photo pixels: the part the model saw, :func:`visattn.image_io.crop_box`); the
    rest of the photo, which the model did not see, is darkened to ``dim`` of its brightness.

    >>> photo = np.full((40, 80, 3), 200, np.uint8)
    >>> out = overlay_on_photo(photo, np.eye(4), (20, 0, 60, 40))
    >>> out.shape, out[0, 0].tolist(), (out[:, 20:60] == overlay(photo[:, 20:60], np.eye(4))).all()
    ((40, 80, 3), [90, 90, 90], np.True_)
    """
    photo = np.asarray(photo, dtype=np.uint8)
    h, w = photo.shape[:2]
    left, top = max(0, int(round(box[0]))), max(0, int(round(box[1])))
    right, bottom = min(w, max(left + 1, int(round(box[2])))), min(h, max(top + 1, int(round(box[3]))))
    out = (photo.astype(np.float32) * dim).round().astype(np.uint8)
    out[top:bottom, left:right] = overlay(photo[top:bottom, left:right], map2d, alpha, cmap, vmin, vmax)
    return out


def overlay_grid_figure(
    image: np.ndarray,
    maps: dict[str, np.ndarray],
    alpha: float = 0.5,
    cmap: str = "inferno",
    query_yx: tuple[float, float] | None = None,
    label: str = "attention weight",
) -> Figure:
    """A grid of overlays: one row per layer, one column per head plus a "mean" column.

    ``maps`` holds (heads, h, w) per layer name. All cells share one colour scale
    (the min and max over every map), shown by one labelled colour bar; ``query_yx``
    (relative, in [0, 1]) is marked in every cell.

    >>> fig = overlay_grid_figure(image, {"blocks.0.attn": maps["attention"]}, query_yx=(0.5, 0.5))
    """
    if not maps:
        raise ValueError("no maps to draw")
    height, width = np.asarray(image).shape[:2]
    heads = max(m.shape[0] for m in maps.values())
    vmin = min(float(np.min(m)) for m in maps.values())
    vmax = max(float(np.max(m)) for m in maps.values())
    fig = Figure(figsize=(1.8 * (heads + 1) + 1.0, 1.9 * len(maps)), layout="constrained")
    axes = fig.subplots(len(maps), heads + 1, squeeze=False)
    for row, (layer, m) in zip(axes, maps.items()):
        cells = {i: (f"head {i}", m[i]) for i in range(m.shape[0])}
        cells[heads] = ("mean", m.mean(0))
        row[0].set_ylabel(layer, fontsize=8)
        for col, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if col not in cells:
                ax.set_frame_on(False)
                continue
            title, cell = cells[col]
            ax.imshow(overlay(image, cell, alpha, cmap, vmin, vmax))
            ax.set_title(title, fontsize=8)
            if query_yx is not None:
                ax.plot(query_yx[1] * width - 0.5, query_yx[0] * height - 0.5, "+", ms=10, mew=2, color="cyan")
    fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), ax=axes, label=label, shrink=0.8)
    return fig


def similarity_figure(
    image: np.ndarray,
    maps: dict[str, np.ndarray],
    query_yx: tuple[float, float] | None = None,
    cmap: str = "inferno",
) -> go.Figure:
    """The image, then "attention", "dot", "cosine" and "softmax" heatmaps side by side.

    Each (h, w) map (a (heads, h, w) one is averaged over heads) covers the image's
    pixel extent with y pointing down, has its own colour bar titled with its
    quantity, and the query is marked in every panel.

    >>> fig = similarity_figure(image, {k: v[0] for k, v in query_maps(site, 0, 27).items()}, (0.4, 0.4))
    """
    img = _rgb(image)
    height, width = img.shape[:2]
    names = [n for n in SIMILARITY_LABELS if n in maps]
    fig = make_subplots(rows=1, cols=len(names) + 1, subplot_titles=["image", *names], horizontal_spacing=0.09)
    fig.add_trace(go.Image(z=np.round(img * 255).astype(np.uint8), x0=0.5, y0=0.5, name="image"), 1, 1)
    scale = plotly_scale(cmap)
    for col, name in enumerate(names, start=2):
        m = np.asarray(maps[name], dtype=np.float32)
        m = m.mean(0) if m.ndim == 3 else m
        dy, dx = height / m.shape[0], width / m.shape[1]
        right = fig.layout[f"xaxis{col}"].domain[1]
        fig.add_trace(
            go.Heatmap(
                z=m, x0=dx / 2, dx=dx, y0=dy / 2, dy=dy, colorscale=scale, name=name,
                colorbar={"title": {"text": SIMILARITY_LABELS[name], "side": "right"}, "x": right + 0.005,
                          "thickness": 10, "len": 0.9},
            ),
            1, col,
        )
    for col in range(1, len(names) + 2):
        if query_yx is not None:
            fig.add_trace(
                go.Scatter(x=[query_yx[1] * width], y=[query_yx[0] * height], mode="markers", name="query",
                           marker={"symbol": "x", **_MARKER}, showlegend=False),
                1, col,
            )
        fig.update_xaxes(range=[0, width], showticklabels=False, constrain="domain", row=1, col=col)
        anchor = "x" if col == 1 else f"x{col}"
        fig.update_yaxes(range=[height, 0], showticklabels=False, scaleanchor=anchor, row=1, col=col)
    fig.update_layout(height=320, margin={"l": 10, "r": 60, "t": 40, "b": 10})
    return fig


def channel_bar_figure(weights: np.ndarray, title: str = "channel attention") -> go.Figure:
    """Bar chart of one squeeze-and-excitation weight per channel (C,).

    >>> channel_bar_figure(np.linspace(0, 1, 16), "stages.0.se").data[0].type
    'bar'
    """
    w = np.asarray(weights, dtype=np.float64).ravel()
    fig = go.Figure(go.Bar(x=np.arange(len(w)), y=w, marker={"color": w, "colorscale": plotly_scale("viridis")}))
    fig.update_layout(title=title, xaxis_title="channel", yaxis_title="weight",
                      yaxis_range=[0, max(1.0, float(w.max(initial=0.0)))], bargap=0.05, height=300)
    return fig


def topk_bar_figure(class_names: Sequence[str], probs: np.ndarray, k: int = 5) -> go.Figure:
    """Horizontal bars of the ``k`` most probable classes, in percent, the best on top.

    >>> topk_bar_figure(["cat", "dog", "car"], np.array([0.2, 0.7, 0.1]), k=2).data[0].text
    ('70.0%', '20.0%')
    """
    p = np.asarray(probs, dtype=np.float64).ravel()
    if len(class_names) != len(p):
        raise ValueError(f"{len(class_names)} class names for {len(p)} probabilities")
    top = np.argsort(-p, kind="stable")[: max(0, min(k, len(p)))]
    pct = p[top] * 100.0
    fig = go.Figure(go.Bar(x=pct, y=list(range(len(top))), orientation="h",
                           text=[f"{v:.1f}%" for v in pct], textposition="auto"))
    fig.update_layout(
        title=f"top-{len(top)} classes", xaxis={"title": "probability (%)", "range": [0, 100]},
        yaxis={"tickvals": list(range(len(top))), "ticktext": [str(class_names[i]) for i in top],
               "autorange": "reversed"},
        height=80 + 36 * len(top), margin={"l": 10, "r": 10, "t": 40, "b": 10},
    )
    return fig


def figure_to_png(fig: Figure, dpi: int = 150) -> bytes:
    """Render a matplotlib figure to PNG bytes.

    >>> figure_to_png(Figure()).startswith(b"\\x89PNG")
    True
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def maps_to_npz(maps: dict[str, np.ndarray]) -> bytes:
    """Pack named arrays into compressed ``.npz`` bytes (read back with ``np.load``).

    >>> sorted(np.load(io.BytesIO(maps_to_npz({"a": np.zeros(2)}))).files)
    ['a']
    """
    buf = io.BytesIO()
    np.savez_compressed(buf, **{name: np.asarray(m) for name, m in maps.items()})
    return buf.getvalue()
