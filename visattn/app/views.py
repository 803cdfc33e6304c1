"""Image-and-query view helpers of the dashboard (no Streamlit import here).

The data set and the checkpoints on offer; image bytes; query positions (a click, a
pixel, a token of a layer's grid); the enlarged and shrunk images drawn on the pages;
the maps of the Explore page, and all of them at once for an ``.npz`` download.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from visattn import paths
from visattn.errors import VisattnError
from visattn.sites import AttentionSite
from visattn.tracing import Trace

COLORMAPS = ("inferno", "viridis", "magma", "plasma", "turbo", "jet", "coolwarm", "gray")


# ----------------------------------------------------------------------------- data and files
def data_available(path: str | os.PathLike | None = None) -> bool:
    """Whether the test split can be read from ``path`` (default ``visattn.paths.data()``)."""
    path = Path(path) if path is not None else paths.data()
    return (path / "test").is_dir() or (path.is_dir() and any(p.is_dir() for p in path.iterdir()))


def load_test_split(path: str | os.PathLike | None = None):
    """The test split (cached by ``visattn.data``); VisattnError when the folder is absent."""
    from visattn.data import load_split

    path = Path(path) if path is not None else paths.data()
    if not data_available(path):
        raise VisattnError(f"test set not found at {path} (set VISATTN_DATA to an image-folder data set)")
    return load_split(str(path), "test")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def array_to_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def sample_png(split, index: int) -> bytes:
    """Test image ``index`` of a :class:`visattn.data.Split` as PNG bytes."""
    return array_to_png(split.images[int(index)].permute(1, 2, 0).numpy())


def checkpoint_key(path: str | os.PathLike) -> str:
    """A cache key that changes whenever the file is rewritten (path, mtime, size)."""
    p = Path(path).resolve()
    st = p.stat()
    return f"path:{p}:{st.st_mtime_ns}:{st.st_size}"


def list_checkpoints() -> dict[str, dict[str, Any]]:
    """``{label: metadata}`` of the shipped checkpoints, then finished runs in ``runs/``.

    Labels are the folder's name and the file's ("checkpoints/sa_cnn.safetensors").
    """
    from visattn.zoo import shipped_checkpoints

    out: dict[str, dict[str, Any]] = {}
    for folder in (paths.checkpoints(), paths.runs()):
        if not folder.is_dir():
            continue
        for name, meta in shipped_checkpoints(folder).items():
            out[f"{folder.name}/{name}"] = meta
    return out


def describe_checkpoint(label: str, meta: dict[str, Any]) -> str:
    """"checkpoints/sa_cnn.safetensors · sa_cnn · 91.2%" for a picker."""
    acc = meta.get("accuracy")
    acc_s = f"{acc:.1%}" if isinstance(acc, (int, float)) else "accuracy n/a"
    return f"{label} · {meta.get('model', '?')} · {acc_s}"


# ----------------------------------------------------------------------------- query positions
def click_to_yx(click: dict[str, Any] | None) -> tuple[float, float] | None:
    """A streamlit-image-coordinates click ``{x, y, width, height}`` -> relative (y, x) in [0, 1)."""
    if not click or not click.get("width") or not click.get("height"):
        return None
    y = float(click["y"]) / float(click["height"])
    x = float(click["x"]) / float(click["width"])
    top = math.nextafter(1.0, 0.0)
    return min(max(y, 0.0), top), min(max(x, 0.0), top)


def pixel_to_yx(row: int, col: int, size: int) -> tuple[float, float]:
    """Centre of pixel (row, col) of a size×size image, relative."""
    return (row + 0.5) / size, (col + 0.5) / size


def yx_to_pixel(yx: tuple[float, float], size: int) -> tuple[int, int]:
    return min(int(yx[0] * size), size - 1), min(int(yx[1] * size), size - 1)


def query_token(site: AttentionSite, yx: tuple[float, float]) -> int:
    """Token index (prefix included) of ``site``'s grid cell under relative (y, x)."""
    from visattn.maps import grid_index

    return grid_index(site, float(yx[0]), float(yx[1]))


def token_cell(site: AttentionSite, token: int) -> tuple[int, int] | None:
    """(row, col) of a token in ``site``'s grid, or None for a prefix (CLS) token."""
    if token < site.prefix:
        return None
    g = token - site.prefix
    return divmod(g, site.grid[1])


def enlarge(
    image: np.ndarray,
    size: int = 320,
    query_yx: tuple[float, float] | None = None,
    grid: tuple[int, int] | None = None,
) -> np.ndarray:
    """The model's input image scaled to ``size`` px (nearest), with the query marked by a
    cyan cross and, when ``grid`` is given, the outline of the grid cell it falls in."""
    img = Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB").resize((size, size), Image.Resampling.NEAREST)
    if query_yx is not None:
        draw = ImageDraw.Draw(img)
        y, x = query_yx[0] * size, query_yx[1] * size
        if grid is not None:
            gh, gw = grid
            r, c = min(int(query_yx[0] * gh), gh - 1), min(int(query_yx[1] * gw), gw - 1)
            ch, cw = size / gh, size / gw
            draw.rectangle([c * cw, r * ch, (c + 1) * cw - 1, (r + 1) * ch - 1], outline=(0, 255, 255), width=2)
        arm = max(6, size // 25)
        for colour, width in (((0, 0, 0), 5), ((0, 255, 255), 2)):
            draw.line([(x - arm, y), (x + arm, y)], fill=colour, width=width)
            draw.line([(x, y - arm), (x, y + arm)], fill=colour, width=width)
    return np.asarray(img)


def shrink(image: np.ndarray, size: int = 128) -> np.ndarray:
    """An (H, W, 3) image no larger than ``size`` px a side (bilinear), for figures with
    many panels; smaller images are returned as they are."""
    h, w = image.shape[:2]
    if max(h, w) <= size:
        return image
    scale = size / max(h, w)
    img = Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB")
    return np.asarray(img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR))


# ----------------------------------------------------------------------------- Explore maps
def query_layer_maps(trace: Trace, yx: tuple[float, float], b: int = 0) -> dict[str, np.ndarray]:
    """``{layer: (heads, H, W)}`` attention of the query under ``yx`` in every attention
    layer (each layer's own grid cell: layers may have different grids)."""
    from visattn.maps import query_maps

    return {name: query_maps(site, b, query_token(site, yx))["attention"] for name, site in trace.attention.items()}


def similarity_maps(site: AttentionSite, yx: tuple[float, float], head: int | None,
                    b: int = 0) -> dict[str, np.ndarray]:
    """``{"attention", "dot", "cosine", "softmax": (H, W)}`` of one head (None: mean of heads)."""
    from visattn.maps import query_maps

    maps = query_maps(site, b, query_token(site, yx))
    out = {}
    for name in ("attention", "dot", "cosine", "softmax"):
        m = maps[name]
        out[name] = m.mean(0) if head is None else m[head]
    return out


def received_maps(trace: Trace, b: int = 0) -> dict[str, np.ndarray]:
    """``{layer: (H, W)}``: attention each grid token receives, averaged over heads and queries."""
    from visattn.maps import received_attention

    return {name: received_attention(site, b).mean(0) for name, site in trace.attention.items()}


def rollout_or_none(trace: Trace, b: int = 0, head_fusion: str = "mean") -> np.ndarray | None:
    """Attention rollout (H, W) in [0, 1], or None for a model without attention."""
    from visattn.maps import rollout_map

    if not trace.attention:
        return None
    return rollout_map(trace, b, head_fusion)


def thumbnail_map(trace: Trace, b: int = 0) -> tuple[str, np.ndarray] | None:
    """The map drawn over a small thumbnail: rollout, else the last CBAM spatial map."""
    roll = rollout_or_none(trace, b)
    if roll is not None:
        return "attention rollout", roll
    if trace.spatial:
        name, site = list(trace.spatial.items())[-1]
        return f"CBAM spatial map ({name})", site.map[b, 0].float().cpu().numpy()
    return None


def raw_maps(trace: Trace, probs: np.ndarray, yx: tuple[float, float], b: int = 0) -> dict[str, np.ndarray]:
    """Every map of the Explore page, for an ``.npz`` download."""
    from visattn.maps import query_maps

    out: dict[str, np.ndarray] = {"probs": np.asarray(probs), "query_yx": np.asarray(yx, dtype=np.float32)}
    for name, site in trace.attention.items():
        for kind, m in query_maps(site, b, query_token(site, yx)).items():
            out[f"query/{name}/{kind}"] = m
    for name, m in received_maps(trace, b).items():
        out[f"received/{name}"] = m
    roll = rollout_or_none(trace, b)
    if roll is not None:
        out["rollout"] = roll
    for name, site in trace.channel.items():
        out[f"channel/{name}"] = site.weights[b].float().cpu().numpy()
    for name, site in trace.spatial.items():
        out[f"spatial/{name}"] = site.map[b, 0].float().cpu().numpy()
    return out


def head_spec(off: list[tuple[str, int]]) -> dict[str, list[int]]:
    """Heads switched off, [(layer, head)], as ``visattn.ablate``'s ``{layer: [head, ...]}``.

    >>> head_spec([("blocks.0.attn", 2), ("blocks.0.attn", 0), ("blocks.1.attn", 1)])
    {'blocks.0.attn': [0, 2], 'blocks.1.attn': [1]}
    """
    spec: dict[str, list[int]] = {}
    for layer, head in off:
        spec.setdefault(layer, []).append(int(head))
    return {layer: sorted(heads) for layer, heads in spec.items()}


def blurred(tensor, sigma: float = 3.0):
    """A corrupted copy of a model input (B, 3, H, W) for activation patching: a Gaussian
    blur of standard deviation ``sigma`` pixels (kernel about 6σ, odd), in the input's own
    normalised space.

    >>> import torch
    >>> blurred(torch.rand(1, 3, 32, 32)).shape
    torch.Size([1, 3, 32, 32])
    """
    from torchvision.transforms.functional import gaussian_blur

    k = 2 * int(3 * sigma) + 1
    return gaussian_blur(tensor, [k, k], [sigma, sigma])
