"""Drawing a query-key atlas (:mod:`visattn.atlas`): per-point attributes, the canvas view
(``atlas_view.js``: every head as small multiples, the image patch on hover, a click
reported to the page or pinned offline) as a Streamlit component or one HTML file, and a PNG."""
from __future__ import annotations

import math
import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from visattn.atlas import UPLOADED, Atlas, HeadMap
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


def head_title(hm: HeadMap) -> str:
    return f"{hm.layer} · head {hm.head} · corr {hm.corr:.2f}"


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def sprite(images: np.ndarray, quality: int = 92) -> tuple[bytes, int]:
    """Every thumbnail (n, 3, s, s) uint8 tiled into one JPEG, ``cols`` a row; (bytes, cols).

    >>> data, cols = sprite(np.zeros((5, 3, 8, 8), np.uint8))
    >>> data[:2] == b"\\xff\\xd8", cols  # a JPEG, 3 thumbnails a row
    (True, 3)
    """
    from PIL import Image

    n, _, s, _ = images.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    sheet = np.zeros((math.ceil(n / cols) * s, cols * s, 3), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        sheet[r * s:(r + 1) * s, c * s:(c + 1) * s] = img.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(sheet).save(buf, "JPEG", quality=quality)
    return buf.getvalue(), cols


def image_word(atlas: Atlas) -> str:
    """How captions name an atlas image: "test image" (its index in the test set) or "uploaded image"."""
    return "uploaded image" if atlas.info.get("data") == UPLOADED else "test image"


def atlas_payload(atlas: Atlas, heads: list[HeadMap] | None = None, colour_by: str = "kind", panel: int = 320,
                  tip: int = 96) -> dict[str, Any]:
    """What ``atlas_view.js`` draws, as JSON-ready values (arrays as base64 little-endian):
    every point's 2D position and norm per head, its image and token per layer, the
    thumbnails as one JPEG sprite (the hover shows the token's patch from it)."""
    heads = heads or atlas.heads
    _colour_values(atlas, {"kind": np.zeros(0)}, colour_by)  # a known colouring, or one clear error
    names = sorted({h.layer for h in heads}, key=list(atlas.layers).index)
    jpeg, cols = sprite(np.asarray(atlas.images))
    return {
        "heads": [{"layer": h.layer, "head": h.head, "corr": float(h.corr), "xy": _b64(np.asarray(h.xy, "<f4")),
                   "norm": _b64(np.concatenate([h.qnorm, h.knorm]).astype("<f4"))} for h in heads],
        "layers": {n: {"grid": [int(g) for g in atlas.layers[n]["grid"]], "prefix": int(atlas.layers[n]["prefix"]),
                       "image": _b64(np.asarray(atlas.layers[n]["image"], "<i4")),
                       "token": _b64(np.asarray(atlas.layers[n]["token"], "<i4"))} for n in names},
        "labels": _b64(np.asarray(atlas.labels, "<i4")), "indices": _b64(np.asarray(atlas.indices, "<i4")),
        "classes": list(atlas.classes), "image_word": image_word(atlas),
        "sprite": base64.b64encode(jpeg).decode("ascii"), "sprite_format": "jpeg", "sprite_cols": cols,
        "thumb": int(atlas.images.shape[-1]), "colour": colour_by, "colour_by": list(COLOUR_BY),
        "kind_colours": list(KIND_COLOURS), "class_colours": list(CLASS_COLOURS), "panel": panel, "tip": tip,
    }


SCRIPT = Path(__file__).with_name("atlas_view.js").read_text(encoding="utf-8")
CSS = """
.va-atlas { position: relative; font: 13px/1.35 system-ui, sans-serif; color: #222; }
.va-bar { margin: 0 0 6px; } .va-grid { display: flex; flex-wrap: wrap; gap: 8px; }
.va-panel { text-align: center; } .va-title { font-size: 12px; margin-bottom: 2px; }
.va-plot { border: 1px solid #ddd; cursor: crosshair; }
.va-tip { display: none; position: absolute; z-index: 10; pointer-events: none; background: #fff; border: 1px solid #888;
          padding: 4px; max-width: 260px; box-shadow: 0 2px 6px rgba(0, 0, 0, .25); }
.va-pinned { margin-top: 8px; max-width: 420px; }
"""
#: The Streamlit component's module: ``drawAtlas`` mounted, a click sent back as the trigger ``picked``.
COMPONENT_JS = SCRIPT + """
export default function (component) {
  const { data, parentElement, setTriggerValue } = component;
  drawAtlas(parentElement, data, (point) => setTriggerValue("picked", point));
}
"""


def atlas_html(atlas: Atlas, heads: list[HeadMap] | None = None, colour_by: str = "kind") -> str:
    """The atlas as one self-contained HTML page: canvases drawn by an inline script from
    inline data; hover shows the patch, a click pins it; a Content-Security-Policy forbids
    any request.

    >>> "connect-src" in _PAGE and "default-src 'none'" in _PAGE
    True
    """
    data = json.dumps(atlas_payload(atlas, heads, colour_by), separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(f"visattn atlas · {atlas.info.get('model') or 'model'}")
    page = _PAGE.replace("__TITLE__", title).replace("__ABOUT__", html.escape(describe(atlas)))
    page = page.replace("__CSS__", CSS).replace("__SCRIPT__", SCRIPT)
    return page.replace("__DATA__", data)  # last: nothing is looked for inside the data


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; connect-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>__TITLE__</title><style>body { margin: 1.5em; } __CSS__</style></head>
<body><h1 style="font: 600 1.4em system-ui, sans-serif">__TITLE__</h1>
<p style="font: 13px system-ui, sans-serif; color: #666">__ABOUT__. Queries green, keys pink (AttentionViz's
normalisation: near means a large q·k, as far as corr says). Point at a dot for its image patch; click to pin it.</p>
<div id="atlas"></div>
<script type="application/json" id="visattn-atlas">__DATA__</script>
<script>
__SCRIPT__
drawAtlas(document.getElementById("atlas"), JSON.parse(document.getElementById("visattn-atlas").textContent), null);
</script></body></html>
"""


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
            "caption": f"{kind} of {image_word(atlas)} {int(t['split_index'][point])} "
                       f"({atlas.classes[int(t['label'][point])]}), "
                       f"{where} of {hm.layer}'s {grid[0]}×{grid[1]} grid, head {hm.head}, norm {t['norm'][point]:.2f}"}
