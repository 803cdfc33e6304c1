"""One self-contained HTML file of an Explore session, readable offline in any browser.

:func:`session_html` runs the model on one image and writes what Explore shows: the
prediction, the layers × heads grid for a query, the query's attention / q·k / cosine /
softmax maps for one layer and head, the rollout and the faithfulness scores of each
explanation method. Every query's rows are precomputed by the same library functions
(:func:`visattn.maps.query_maps`, :func:`visattn.maps.rollout_map`,
:func:`visattn.faithfulness.faithfulness_for`) and embedded as base64 float32 arrays; a
small hand-written canvas renderer (no library, no network) draws them, so clicking the
image moves the query without a server.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visattn.errors import VisattnError
from visattn.inference import Analysis, Source, analyse

KINDS = ("attention", "dot", "cosine", "softmax")  # the similarity maps of a query, as Explore draws them
MAX_FLOATS = 4_000_000  # 16 MB of float32 query maps: more asks for fewer layers
SIDE = 320  # px of the clickable image


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def query_rows(analysis: Analysis, layers: list[str] | None = None) -> list[dict[str, Any]]:
    """Per attention layer: its grid, and the :func:`visattn.maps.query_maps` of every grid
    query as one float32 array (grid queries, kinds, heads, H·W) in :data:`KINDS` order."""
    from visattn.maps import query_maps

    sites = analysis.trace.attention
    names = list(sites) if layers is None else layers
    unknown = [n for n in names if n not in sites]
    if unknown:
        raise VisattnError(f"no attention layer {unknown[0]!r}; this model's: {', '.join(sites) or 'none'}")
    total = sum(sites[n].grid[0] * sites[n].grid[1] * len(KINDS) * sites[n].heads * sites[n].q.shape[2] for n in names)
    if total > MAX_FLOATS:
        raise VisattnError(f"the query maps of {len(names)} layers take {total * 4 / 2**20:.0f} MB; "
                           "choose fewer layers (--layer)")
    out = []
    for name in names:
        site = sites[name]
        h, w = site.grid
        rows = np.empty((h * w, len(KINDS), site.heads, h * w), np.float32)
        for cell in range(h * w):
            maps = query_maps(site, 0, site.prefix + cell)
            for i, kind in enumerate(KINDS):
                rows[cell, i] = maps[kind].reshape(site.heads, h * w)
        out.append({"name": name, "grid": [h, w], "heads": site.heads, "similarity": site.similarity,
                    "rows": rows})
    return out


def session_data(model: nn.Module, meta: dict[str, Any], image: Source, *, name: str = "image",
                 layers: list[str] | None = None, methods: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Everything the HTML file shows, as plain Python (arrays still numpy).

    ``methods``: explanation methods to score for faithfulness (default every one that
    applies, as Compare does, for the predicted class).
    """
    from visattn.explain import METHODS
    from visattn.faithfulness import faithfulness_for
    from visattn.maps import rollout_map
    from visattn.panels import colour_table

    a = analyse(model, meta, image)
    target = a.predicted
    explained = {}
    for m in methods if methods is not None else tuple(METHODS):
        if m not in METHODS:
            raise VisattnError(f"unknown method {m!r}; known: {', '.join(METHODS)}")
        e = METHODS[m](model, a.tensor, target)
        if e is not None:
            explained[m] = e.map
    scores = faithfulness_for(model, a.tensor, explained, target)
    sites = a.trace.attention
    return {
        "name": name, "model": meta.get("model", "?"), "accuracy": meta.get("accuracy"),
        "classes": list(a.classes), "probs": a.probs.astype(np.float32), "predicted": target,
        "image": a.image, "layers": query_rows(a, layers),
        "rollout": rollout_map(a.trace).astype(np.float32) if sites else None,
        "faithfulness": {m: {"label": METHODS[m].label if m in METHODS else m, "deletion_auc": r["deletion_auc"],
                             "insertion_auc": r["insertion_auc"]} for m, r in scores.items()},
        "colormap": colour_table("inferno"),
    }


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def to_json(data: dict[str, Any]) -> str:
    """The embedded JSON: arrays as base64 (float32 little-endian, uint8 colormap, PNG image)."""
    out = {k: v for k, v in data.items() if k not in ("probs", "image", "layers", "rollout", "colormap")}
    out["kinds"] = list(KINDS)
    out["probs"] = _b64(np.asarray(data["probs"], "<f4"))
    out["image"] = base64.b64encode(_png(data["image"])).decode("ascii")
    out["colormap"] = _b64(np.asarray(data["colormap"], np.uint8))
    out["layers"] = [{**{k: v for k, v in lay.items() if k != "rows"}, "rows": _b64(np.asarray(lay["rows"], "<f4"))}
                     for lay in data["layers"]]
    roll = data["rollout"]
    out["rollout"] = None if roll is None else {"grid": list(roll.shape), "values": _b64(np.asarray(roll, "<f4"))}
    return json.dumps(out, separators=(",", ":")).replace("</", "<\\/")


def session_html(model: nn.Module, meta: dict[str, Any], image: Source, *, name: str = "image",
                 layers: list[str] | None = None, methods: tuple[str, ...] | None = None) -> str:
    """The session as one HTML page: inline data, inline script, nothing fetched
    (a Content-Security-Policy forbids any request).

    >>> import io
    >>> from PIL import Image
    >>> from visattn import create_model
    >>> model = create_model("sa_cnn", widths=(8, 16, 16), heads=2).eval()
    >>> meta = {"classes": list("abcdefghij"), "mean": [0.5] * 3, "std": [0.25] * 3}
    >>> png = io.BytesIO()
    >>> Image.new("RGB", (32, 32), (200, 40, 40)).save(png, "PNG")
    >>> page = session_html(model, meta, png.getvalue(), methods=("saliency",))
    >>> page.startswith("<!doctype html>"), "http://" in page or "https://" in page
    (True, False)
    """
    data = session_data(model, meta, image, name=name, layers=layers, methods=methods)
    title = html.escape(f"visattn · {name} · {data['model']}")
    page = _TEMPLATE.replace("__TITLE__", title).replace("__SIDE__", str(SIDE)).replace("__SCRIPT__", _SCRIPT)
    return page.replace("__DATA__", to_json(data))  # last: nothing is looked for inside the data


_TEMPLATE_PATH = Path(__file__).with_name("export_template.html")
_SCRIPT_PATH = Path(__file__).with_name("export_session.js")
_TEMPLATE = _TEMPLATE_PATH.read_text(encoding="utf-8")
_SCRIPT = _SCRIPT_PATH.read_text(encoding="utf-8")
