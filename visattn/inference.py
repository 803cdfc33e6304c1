"""From an image file to predictions and attention maps, for the CLI and the dashboard."""
from __future__ import annotations

import os
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


def write_explanation(model: nn.Module, meta: dict[str, Any], image: Source, out_dir: Path) -> list[Path]:
    """PNG overlays of every layer and head, the rollout map, and an .npz of raw maps."""
    from visattn.maps import rollout_map
    from visattn.plotting import figure_to_png, maps_to_npz, overlay, overlay_grid_figure
    from PIL import Image

    a = analyse(model, meta, image)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    maps = layer_head_maps(a)
    raw: dict[str, np.ndarray] = {f"attention/{k}": v for k, v in maps.items()}
    raw["probs"] = a.probs
    if maps:
        path = out_dir / "attention_layers_heads.png"
        path.write_bytes(figure_to_png(overlay_grid_figure(a.image, maps, 0.5, "inferno", None)))
        written.append(path)
        for layer, heads in maps.items():
            for h, m in enumerate(heads):
                path = out_dir / f"{layer.replace('.', '_')}_head{h}.png"
                Image.fromarray(overlay(a.image, m)).save(path)
                written.append(path)
        roll = rollout_map(list(a.trace.attention.values()), 0)
        raw["rollout"] = roll
        path = out_dir / "rollout.png"
        Image.fromarray(overlay(a.image, roll)).save(path)
        written.append(path)
    for name, site in a.trace.channel.items():
        raw[f"channel/{name}"] = site.weights[0].cpu().numpy()
    for name, site in a.trace.spatial.items():
        raw[f"spatial/{name}"] = site.map[0, 0].cpu().numpy()
        path = out_dir / f"spatial_{name.replace('.', '_')}.png"
        Image.fromarray(overlay(a.image, raw[f"spatial/{name}"])).save(path)
        written.append(path)
    path = out_dir / "maps.npz"
    path.write_bytes(maps_to_npz(raw))
    written.append(path)
    return written
