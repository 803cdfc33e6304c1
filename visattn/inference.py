"""From an image file to predictions and attention maps, for the CLI and the dashboard."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

from PIL import Image

from visattn.image_io import DECODE_SIDE, crop_box, image_to_tensor, image_to_uint8_array, load_image
from visattn.tracing import Trace, capture

Source = str | os.PathLike | bytes | BinaryIO
PHOTO_SIDE = 640  # longer side of the photo kept for drawing maps over it whole


def input_size(meta: dict[str, Any]) -> int:
    return int(meta.get("image_size") or meta.get("config", {}).get("image_size") or 32)


def model_inputs(images: Tensor, meta: dict[str, Any]) -> Tensor:
    """uint8 (B, 3, S, S) -> normalised float at the model's input size."""
    from visattn.data import normalise

    x = normalise(images, tuple(meta["mean"]), tuple(meta["std"]))
    size = input_size(meta)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


@dataclass
class Analysis:
    """One image through one model: what the dashboard draws."""

    image: np.ndarray  # (S, S, 3) uint8, exactly what the model saw, for overlays
    tensor: Tensor  # (1, 3, S, S) normalised input
    trace: Trace
    probs: np.ndarray  # (classes,)
    classes: list[str]
    photo: np.ndarray | None = None  # (h, w, 3) uint8: the whole photo, longer side <= PHOTO_SIDE
    box: tuple[float, float, float, float] | None = None  # where ``image`` lies in ``photo`` (l, t, r, b px)

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        order = np.argsort(-self.probs)[:k]
        return [(self.classes[i], float(self.probs[i])) for i in order]

    @property
    def predicted(self) -> int:
        return int(self.probs.argmax())

    @property
    def nbytes(self) -> int:
        """Memory it holds: the trace (``Trace.nbytes``), the image, the input and the probabilities."""
        photo = self.photo.nbytes if self.photo is not None else 0
        return self.trace.nbytes + self.image.nbytes + photo + self.tensor.untyped_storage().nbytes() + self.probs.nbytes


def _load(source: Source, meta: dict[str, Any]) -> Image.Image:
    """The photo, refused with ImageError when bad; big ones decoded reduced (see
    :func:`~visattn.image_io.load_image`)."""
    return load_image(source, min_side=max(DECODE_SIDE, 2 * input_size(meta)))


def _preprocess(img: Image.Image, meta: dict[str, Any]) -> tuple[np.ndarray, Tensor]:
    size = input_size(meta)
    how = {"resize": meta.get("resize"), "interpolation": meta.get("interpolation", "bicubic")}
    return image_to_uint8_array(img, size, **how), image_to_tensor(img, size, meta["mean"], meta["std"], **how)[None]


def prepare(source: Source, meta: dict[str, Any]) -> tuple[np.ndarray, Tensor]:
    """Load (refusing bad files with ImageError) and preprocess: (display uint8, model input)."""
    return _preprocess(_load(source, meta), meta)


def photo_and_box(img: Image.Image, meta: dict[str, Any], side: int = PHOTO_SIDE) -> tuple[np.ndarray, tuple[float, ...]]:
    """The whole photo, its longer side at most ``side`` px, and the box in it the model saw
    (:func:`~visattn.image_io.crop_box`, in that photo's pixels).

    >>> photo, box = photo_and_box(Image.new("RGB", (1280, 640)), {"image_size": 224, "resize": 256})
    >>> photo.shape, box
    ((320, 640, 3), (180.0, 20.0, 460.0, 300.0))
    """
    box = crop_box(*img.size, input_size(meta), meta.get("resize"))
    scale = min(1.0, side / max(img.size))
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).copy(), tuple(float(v) * scale for v in box)


def analyse_tensor(model: nn.Module, meta: dict[str, Any], image: np.ndarray, tensor: Tensor) -> Analysis:
    """Capture attention for an already prepared image."""
    trace = capture(model, tensor.to(next(model.parameters()).device))
    probs = torch.softmax(trace.logits[0].float(), -1).cpu().numpy()
    return Analysis(image=image, tensor=tensor, trace=trace, probs=probs, classes=list(meta["classes"]))


def analyse(model: nn.Module, meta: dict[str, Any], source: Source) -> Analysis:
    """Load an image and capture the model's prediction and attention on it.

    Example::

        model, meta = load_checkpoint("checkpoints/sa_cnn.safetensors")
        analyse(model, meta, "cat.jpg").top(3)  # [(class, probability), ...]
    """
    img = _load(source, meta)
    analysis = analyse_tensor(model, meta, *_preprocess(img, meta))
    analysis.photo, analysis.box = photo_and_box(img, meta)
    return analysis


def predict_image(model: nn.Module, meta: dict[str, Any], source: Source, k: int = 5) -> list[tuple[str, float]]:
    """Top-``k`` (class, probability) for one image."""
    _, x = prepare(source, meta)
    with torch.no_grad():
        probs = torch.softmax(model(x.to(next(model.parameters()).device)).float(), -1)[0]
    p, i = probs.topk(min(k, len(probs)))
    return [(meta["classes"][j], float(q)) for q, j in zip(p.tolist(), i.tolist())]


def layer_head_maps(analysis: Analysis, query: int | None = None) -> dict[str, np.ndarray]:
    """``{layer: (heads, H, W)}``: each head's attention for ``query`` (token index), or,
    when ``query`` is None, the attention each grid token receives averaged over queries."""
    from visattn.maps import query_maps, received_attention

    out = {}
    for name, site in analysis.trace.attention.items():
        if query is None:
            out[name] = received_attention(site, 0)
        else:
            out[name] = query_maps(site, 0, min(query, site.q.shape[2] - 1))["attention"]
    return out


def _png(rgb: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def write_explanation(model: nn.Module, meta: dict[str, Any], image: Source, out_dir: Path,
                      methods: Sequence[str] | None = None) -> tuple[list[Path], list[str]]:
    """PNG overlays of every layer and head, one overlay per explanation method
    (``visattn.explain.METHODS``, or those named in ``methods``; predicted class, each
    method's default layer) and an .npz of the raw maps (``attention/LAYER`` (heads, h, w),
    ``explain/METHOD`` (H, W), ``conservation/METHOD`` (1,) for LRP methods, ``channel/…``,
    ``spatial/…``, ``probs``).

    Everything is computed before the first file is written. Returns (files written, notes):
    a method that does not apply to the model, or whose map is constant (no PNG drawn for
    it), gets a note instead; an LRP method's note gives its conservation figure.
    """
    from visattn import explain
    from visattn.plotting import figure_to_png, maps_to_npz, overlay, overlay_grid_figure

    rows = [explain.method(m) for m in (explain.METHODS if methods is None else methods)]
    a = analyse(model, meta, image)
    files: dict[str, bytes] = {}
    notes: list[str] = []
    maps = layer_head_maps(a)
    raw: dict[str, np.ndarray] = {f"attention/{k}": v for k, v in maps.items()}
    raw["probs"] = a.probs
    if maps:
        files["attention_layers_heads.png"] = figure_to_png(overlay_grid_figure(a.image, maps, 0.5, "inferno", None))
        for layer, heads in maps.items():
            for h, m in enumerate(heads):
                files[f"{layer.replace('.', '_')}_head{h}.png"] = _png(overlay(a.image, m))
    for row in rows:
        e = row(model, a.tensor.to(next(model.parameters()).device), a.predicted)
        if e is None:
            reason = explain.why_unavailable(model, a.tensor, row.name, bool(a.trace.attention))
            notes.append(f"{row.name}: not available for this model" + (f": {reason}" if reason else ""))
            continue
        raw[f"explain/{row.name}"] = e.map
        if e.conservation is not None:
            raw[f"conservation/{row.name}"] = e.conservation
            notes.append(f"{row.name}: conservation |Σ relevance − logit| / |logit| = {float(e.conservation[0]):.2%}")
        if e.constant:
            notes.append(f"{row.name}: the map is constant (nothing to draw, no PNG)")
        else:
            files[f"{row.name}.png"] = _png(overlay(a.image, e.map))
    for name, site in a.trace.channel.items():
        raw[f"channel/{name}"] = site.weights[0].cpu().numpy()
    for name, site in a.trace.spatial.items():
        raw[f"spatial/{name}"] = site.map[0, 0].cpu().numpy()
        files[f"spatial_{name.replace('.', '_')}.png"] = _png(overlay(a.image, raw[f"spatial/{name}"]))
    files["maps.npz"] = maps_to_npz(raw)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
        written.append(out_dir / name)
    return written, notes
