"""Drawing a query-key atlas (:mod:`visattn.atlas`): per-point attributes, plotly
scatter plots (one head, or every head as small multiples) and a PNG."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from visattn.atlas import Atlas, HeadMap
from visattn.errors import VisattnError

COLOUR_BY = ("kind", "row", "column", "class", "norm")
KIND_COLOURS = ("#2ca02c", "#e377c2")  # queries green, keys pink, as AttentionViz draws them
CLASS_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                 "#17becf")


def point_table(atlas: Atlas, hm: HeadMap) -> dict[str, np.ndarray]:
    """Per point of ``hm.xy`` (queries first, then keys): ``kind`` (0 query, 1 key),
    ``image`` (index into ``atlas.images``), ``split_index`` (into the data set's split),
    ``token``, ``row`` and ``column`` in the layer's grid (-1 for CLS/prefix tokens),
    ``label`` and ``norm`` (of the raw vector).
    """
    lay = atlas.layers[hm.layer]
    image, token = np.asarray(lay["image"]), np.asarray(lay["token"])
    m = len(token)
    grid_w, prefix = int(lay["grid"][1]), int(lay["prefix"])
    cell = token - prefix
    row = np.where(cell >= 0, cell // grid_w, -1)
    col = np.where(cell >= 0, cell % grid_w, -1)
    both = lambda a: np.concatenate([a, a])  # noqa: E731 (queries and keys share their token's attributes)
    return {"kind": np.repeat([0, 1], m), "image": both(image), "split_index": both(atlas.indices[image]),
            "token": both(token), "row": both(row), "column": both(col), "label": both(atlas.labels[image]),
            "norm": np.concatenate([hm.qnorm, hm.knorm])}


def _colour_values(atlas: Atlas, table: dict[str, np.ndarray], colour_by: str) -> tuple[np.ndarray, str]:
    if colour_by not in COLOUR_BY:
        raise VisattnError(f"colour by one of {', '.join(COLOUR_BY)}, not {colour_by!r}")
    key = {"class": "label"}.get(colour_by, colour_by)
    return table[key], colour_by


def _traces(atlas: Atlas, hm: HeadMap, colour_by: str, show_legend: bool) -> list:
    import plotly.graph_objects as go

    t = _table = point_table(atlas, hm)
    values, _ = _colour_values(atlas, _table, colour_by)
    custom = np.stack([t["kind"], t["split_index"], t["row"], t["column"], t["label"], t["norm"], t["image"],
                       t["token"], np.full(len(t["kind"]), hm.head), np.arange(len(t["kind"]))], axis=1)
    kind_name = np.array(["query", "key"])[t["kind"]]
    hover = ("%{text} · image %{customdata[1]} (class %{customdata[4]})<br>row %{customdata[2]}, "
             "column %{customdata[3]} · norm %{customdata[5]:.2f}<extra></extra>")
    base = {"x": hm.xy[:, 0], "y": hm.xy[:, 1], "mode": "markers", "hovertemplate": hover}
    if colour_by in ("kind", "class"):
        groups = [(i, name) for i, name in enumerate(("query", "key") if colour_by == "kind" else atlas.classes)]
        palette = KIND_COLOURS if colour_by == "kind" else CLASS_COLOURS
        out = []
        for i, name in groups:
            sel = values == i
            if sel.any():
                out.append(go.Scattergl(**{**base, "x": hm.xy[sel, 0], "y": hm.xy[sel, 1]}, name=name,
                                        legendgroup=name, showlegend=show_legend, text=kind_name[sel],
                                        customdata=custom[sel],
                                        marker={"size": 3, "color": palette[i % len(palette)], "opacity": 0.6}))
        return out
    return [go.Scattergl(**base, text=kind_name, customdata=custom, showlegend=False,
                         marker={"size": 3, "color": values, "colorscale": "Viridis", "opacity": 0.7,
                                 "showscale": show_legend, "colorbar": {"title": colour_by}})]


def head_title(hm: HeadMap) -> str:
    return f"{hm.layer} · head {hm.head} · corr {hm.corr:.2f}"


def atlas_figure(atlas: Atlas, heads: list[HeadMap] | None = None, colour_by: str = "kind", cols: int = 4,
                 panel: int = 320):
    """Plotly scatter of ``heads`` (default: all) as small multiples, ``cols`` per row.

    Each point's ``customdata``: kind (0 query, 1 key), split index, row, column, label,
    norm, atlas image index, token, head, and the point's index in ``HeadMap.xy``.
    """
    from plotly.subplots import make_subplots

    heads = heads or atlas.heads
    cols = max(1, min(cols, len(heads)))
    rows = math.ceil(len(heads) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[head_title(h) for h in heads],
                        horizontal_spacing=0.03, vertical_spacing=0.08 / max(1, rows - 1) if rows > 1 else 0.1)
    for i, hm in enumerate(heads):
        for tr in _traces(atlas, hm, colour_by, show_legend=i == 0):
            fig.add_trace(tr, row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_layout(height=panel * rows + 80, margin={"l": 10, "r": 10, "t": 60, "b": 10},
                      legend={"itemsizing": "constant"}, dragmode="pan", clickmode="event+select")
    return fig


def atlas_png(atlas: Atlas, heads: list[HeadMap] | None = None, colour_by: str = "kind", cols: int = 4) -> bytes:
    """The small multiples as a PNG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from visattn.plotting import figure_to_png

    heads = heads or atlas.heads
    cols = max(1, min(cols, len(heads)))
    rows = math.ceil(len(heads) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, hm in zip(axes.flat, heads):
        table = point_table(atlas, hm)
        values, _ = _colour_values(atlas, table, colour_by)
        if colour_by in ("kind", "class"):
            palette = np.array(KIND_COLOURS if colour_by == "kind" else CLASS_COLOURS)
            ax.scatter(hm.xy[:, 0], hm.xy[:, 1], s=1, c=palette[values % len(palette)], alpha=0.6, linewidths=0)
        else:
            ax.scatter(hm.xy[:, 0], hm.xy[:, 1], s=1, c=values, cmap="viridis", alpha=0.7, linewidths=0)
        ax.set_title(head_title(hm), fontsize=8)
    fig.suptitle(f"{describe(atlas)}; colour: {colour_by}", fontsize=9)
    return figure_to_png(fig, dpi=120)


def describe(atlas: Atlas) -> str:
    """One line: how many images and tokens, how they were sampled and embedded."""
    info = atlas.info
    parts = []
    for name, m in info.get("sampled", {}).items():
        total = info.get("all_tokens", {}).get(name, m)
        parts.append(f"{name}: {m:,} of {total:,} tokens" + (" (random sample)" if m < total else ""))
    return (f"{info.get('n', len(atlas.indices)):,} images, {info.get('method', '?').upper()} of queries and keys; "
            + "; ".join(parts))


def summary_json(atlas: Atlas) -> dict[str, Any]:
    """What ``visattn atlas --json`` prints."""
    return {"images": int(len(atlas.indices)), "info": atlas.info, "heads": atlas.summary(), "description": describe(atlas)}


def point_target(atlas: Atlas, hm: HeadMap, point: int) -> dict[str, Any]:
    """Where Explore should open for point ``point`` of ``hm``: the image's index in the
    split, the centre of its token's grid cell as relative (y, x) (the image centre for
    a CLS/prefix token), the layer and head, and a caption.
    """
    t = point_table(atlas, hm)
    grid = atlas.layers[hm.layer]["grid"]
    row, col = int(t["row"][point]), int(t["column"][point])
    yx = (0.5, 0.5) if row < 0 else ((row + 0.5) / grid[0], (col + 0.5) / grid[1])
    kind = ("query", "key")[int(t["kind"][point])]
    where = "the CLS token" if row < 0 else f"row {row}, column {col}"
    return {"sample_index": int(t["split_index"][point]), "image": int(t["image"][point]), "query_yx": yx,
            "layer": hm.layer, "head": hm.head, "kind": kind,
            "caption": f"{kind} of test image {int(t['split_index'][point])} ({atlas.classes[int(t['label'][point])]}), "
                       f"{where} of {hm.layer}'s {grid[0]}×{grid[1]} grid, head {hm.head}, norm {t['norm'][point]:.2f}"}
