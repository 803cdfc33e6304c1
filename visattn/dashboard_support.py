"""Plain-Python helpers behind the Streamlit dashboard (no Streamlit import here).

The dashboard pages stay thin: widgets, one call into this module (or into
``inference`` / ``maps`` / ``explain``), a plot. Everything here works on NumPy /
torch objects and can be tested without a browser.

Contents: where the data and runs live; image bytes and query positions; the maps of
the Explore page; the five steps of the Learn page (:func:`lesson`); test-set
evaluation and head statistics (Models page); training runs started as background
processes and their metrics files (Train page); adapters to ``visattn.faithfulness``.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.nn import functional as F

from visattn.capture import AttentionSite, Trace, capture
from visattn.errors import VisattnError

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNS_DIR = REPO_ROOT / "runs"
DEFAULT_DATA = "../shared/datasets/cifar10"
COLORMAPS = ("inferno", "viridis", "magma", "plasma", "turbo", "jet", "coolwarm", "gray")


# ----------------------------------------------------------------------------- data and files
def data_path() -> Path:
    """The image-folder data set: ``$VISATTN_DATA`` or ``../shared/datasets/cifar10``,
    a relative path being taken from the repository root (not the working directory)."""
    raw = os.environ.get("VISATTN_DATA") or DEFAULT_DATA
    path = Path(raw).expanduser()
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def data_available(path: str | os.PathLike | None = None) -> bool:
    """Whether the test split can be read from ``path`` (default :func:`data_path`)."""
    path = Path(path) if path is not None else data_path()
    return (path / "test").is_dir() or (path.is_dir() and any(p.is_dir() for p in path.iterdir()))


def load_test_split(path: str | os.PathLike | None = None):
    """The test split (cached by ``visattn.data``); VisattnError when the folder is absent."""
    from visattn.data import load_split

    path = Path(path) if path is not None else data_path()
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

    Labels are paths relative to the repository root ("checkpoints/sa_cnn.safetensors").
    """
    from visattn.zoo import CHECKPOINT_DIR, shipped_checkpoints

    out: dict[str, dict[str, Any]] = {}
    for folder in (CHECKPOINT_DIR, RUNS_DIR):
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
    out = {}
    for name, site in trace.attention.items():
        w = site.full_weights(b)[:, site.prefix :, site.prefix :].float().mean(dim=(0, 1))
        out[name] = w.reshape(site.grid).cpu().numpy()
    return out


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


# ----------------------------------------------------------------------------- the Learn page
@dataclass
class Lesson:
    """The numbers of one attention step for one query token and one head.

    Vectors are 1-D NumPy arrays; ``*_grid`` maps are (H, W) over the grid keys.
    """

    layer: str
    head: int
    heads: int
    token: int
    cell: tuple[int, int] | None
    similarity: str  # "dot" or "cosine"
    d_k: int
    scale: float
    q: np.ndarray  # (d_k,)
    k: np.ndarray  # (d_k,) the key at the query's own position
    v: np.ndarray  # (d_v,) the value at the query's own position
    dot: np.ndarray  # (N,) q·k_j
    cosine: np.ndarray  # (N,) cos(q, k_j)
    scores: np.ndarray  # (N,) what this layer compares: dot or cosine
    logits: np.ndarray  # (N,) scores × scale (+ relative-position bias)
    bias: np.ndarray | None  # (N,) the bias added, if any
    weights: np.ndarray  # (N,) softmax(logits): sum 1
    layer_weights: np.ndarray  # (N,) the weights the layer really used (recorded)
    weights_error: float  # max |weights - layer_weights|
    textbook: np.ndarray  # (N,) softmax(q·k / √d_k), whatever the layer uses
    top: list[tuple[int, str, float]]  # (token, "row r, col c" / "CLS", weight), best first
    head_context: np.ndarray  # (d_v,) Σ_j w_j v_j of this head
    head_context_check: float  # max |head_context - the layer's own (weights @ V)|
    inputs: np.ndarray | None = None  # (C,) what Q, K, V were computed from, at this position
    context: np.ndarray | None = None  # (C,) the attention output after the projection W_O
    outputs: np.ndarray | None = None  # (C,) after the residual add
    gate: float | None = None
    residual_error: float | None = None  # max |outputs - (inputs + gate·context)|
    grid: tuple[int, int] = (0, 0)
    prefix: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_grid(self, values: np.ndarray) -> np.ndarray:
        """(N,) over all keys -> (H, W) over the grid keys."""
        return np.asarray(values)[self.prefix :].reshape(self.grid)

    @property
    def sum_weights(self) -> float:
        return float(self.weights.sum())


def key_name(site: AttentionSite, token: int) -> str:
    cell = token_cell(site, token)
    return "CLS / extra token" if cell is None else f"row {cell[0]}, col {cell[1]}"


def lesson(site: AttentionSite, token: int, head: int, b: int = 0, top: int = 5) -> Lesson:
    """Recompute one head's attention step for query ``token`` from the recorded Q, K, V,
    and check each step against what the layer recorded.

    >>> ls = lesson(trace.attention["stages.1.1"], token=27, head=0)
    >>> round(ls.sum_weights, 6), ls.weights_error < 1e-4
    (1.0, True)
    """
    n = site.q.shape[2]
    if not 0 <= token < n:
        raise VisattnError(f"query token {token} outside 0..{n - 1}")
    if not 0 <= head < site.heads:
        raise VisattnError(f"head {head} outside 0..{site.heads - 1}")
    q = site.q[b, head, token].float()
    keys = site.k[b, head].float()  # (N, d_k)
    values = site.v[b, head].float()  # (N, d_v)
    dot = keys @ q
    cosine = F.normalize(keys, dim=-1) @ F.normalize(q, dim=0)
    scores = cosine if site.similarity == "cosine" else dot
    bias = site.bias[head, token].float() if site.bias is not None else None
    logits = scores * site.scale + (bias if bias is not None else 0.0)
    weights = logits.softmax(-1)
    layer_weights = site.row(b, token)[head].float()
    d_k = q.shape[0]
    textbook = (dot / math.sqrt(d_k)).softmax(-1)
    order = torch.argsort(weights, descending=True)[: min(top, n)].tolist()
    head_context = weights @ values
    recorded = layer_weights @ values
    les = Lesson(
        layer=site.name, head=head, heads=site.heads, token=token, cell=token_cell(site, token),
        similarity=site.similarity, d_k=d_k, scale=float(site.scale),
        q=q.numpy(), k=keys[token].numpy(), v=values[token].numpy(),
        dot=dot.numpy(), cosine=cosine.numpy(), scores=scores.numpy(), logits=logits.numpy(),
        bias=None if bias is None else bias.numpy(), weights=weights.numpy(), layer_weights=layer_weights.numpy(),
        weights_error=float((weights - layer_weights).abs().max()), textbook=textbook.numpy(),
        top=[(j, key_name(site, j), float(weights[j])) for j in order],
        head_context=head_context.numpy(), head_context_check=float((head_context - recorded).abs().max()),
        grid=tuple(site.grid), prefix=site.prefix,
    )
    if site.inputs is not None:
        les.inputs = site.inputs[b, token].float().cpu().numpy()
    if site.context is not None:
        les.context = site.context[b, token].float().cpu().numpy()
    if site.outputs is not None and site.inputs is not None and site.context is not None:
        les.outputs = site.outputs[b, token].float().cpu().numpy()
        les.gate = float(site.gate)
        les.residual_error = float(np.abs(les.outputs - (les.inputs + les.gate * les.context)).max())
    return les


def next_layer(trace: Trace, layer: str) -> str | None:
    """The attention layer after ``layer`` in forward order, or None for the last one."""
    names = list(trace.attention)
    i = names.index(layer) if layer in names else -1
    return names[i + 1] if 0 <= i < len(names) - 1 else None


# ----------------------------------------------------------------------------- Models page
def _model_inputs(images: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> normalised float at the model's input size."""
    from visattn.data import normalise
    from visattn.inference import input_size

    x = normalise(images, tuple(meta["mean"]), tuple(meta["std"]))
    size = input_size(meta)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def evaluate_sample(model: nn.Module, meta: dict[str, Any], split, n: int = 1000, seed: int = 0,
                    batch_size: int = 250) -> dict[str, np.ndarray]:
    """Predictions on a fixed random sample of ``n`` test images.

    Returns ``indices`` (into the split), ``labels``, ``pred``, ``confusion`` (k, k; rows
    true, columns predicted), ``per_class`` accuracy (k,) and ``accuracy`` (scalar array).
    Classes are the split's; a model with other classes (ImageNet) is refused.
    """
    k = len(split.classes)
    if len(meta.get("classes", [])) != k:
        raise VisattnError(f"this model predicts {len(meta.get('classes', []))} classes; the test set has {k}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(split), generator=g)[: min(n, len(split))]
    device = next(model.parameters()).device
    preds = []
    for i in range(0, len(idx), batch_size):
        x = _model_inputs(split.images[idx[i : i + batch_size]], meta).to(device)
        preds.append(model(x).argmax(1).cpu())
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)
    labels = split.labels[idx]
    confusion = torch.zeros(k, k, dtype=torch.int64)
    confusion.index_put_((labels, pred), torch.ones_like(pred), accumulate=True)
    per_class = confusion.diag().float() / confusion.sum(1).clamp(min=1).float()
    return {
        "indices": idx.numpy(), "labels": labels.numpy(), "pred": pred.numpy(), "confusion": confusion.numpy(),
        "per_class": per_class.numpy(),
        "accuracy": np.asarray((pred == labels).float().mean().item() if len(idx) else 0.0),
    }


def misclassified(result: dict[str, np.ndarray], true: int, predicted: int) -> np.ndarray:
    """Split indices of the sampled images with label ``true`` predicted as ``predicted``."""
    mask = (result["labels"] == true) & (result["pred"] == predicted)
    return result["indices"][mask]


@torch.no_grad()
def head_statistics(model: nn.Module, meta: dict[str, Any], images: torch.Tensor,
                    batch_size: int = 32) -> dict[str, dict[str, np.ndarray]]:
    """Per-head entropy (nats) and mean attention distance (input pixels), by layer,
    averaged over ``images`` (uint8 (B, 3, S, S)). Empty for a model without attention."""
    from visattn.inference import input_size
    from visattn.maps import head_entropy, mean_attention_distance

    size = input_size(meta)
    device = next(model.parameters()).device
    sums: dict[str, dict[str, np.ndarray]] = {}
    total = 0
    for i in range(0, len(images), batch_size):
        x = _model_inputs(images[i : i + batch_size], meta).to(device)
        trace = capture(model, x)
        nb = len(x)
        for name, site in trace.attention.items():
            cell = size / site.grid[1]
            ent = head_entropy(site) * nb
            dist = mean_attention_distance(site, cell_size=cell) * nb
            s = sums.setdefault(name, {"entropy": np.zeros_like(ent), "distance": np.zeros_like(dist),
                                       "max_entropy": np.asarray(math.log(site.q.shape[2]))})
            s["entropy"] = s["entropy"] + ent
            s["distance"] = s["distance"] + dist
        total += nb
    for s in sums.values():
        s["entropy"] = s["entropy"] / max(total, 1)
        s["distance"] = s["distance"] / max(total, 1)
    return sums


# ----------------------------------------------------------------------------- Compare page
METHOD_LABELS = {
    "attention": "Attention (last layer)", "rollout": "Attention rollout", "grad_cam": "Grad-CAM",
    "integrated_gradients": "Integrated gradients", "saliency": "Saliency", "occlusion": "Occlusion",
}


SLOW_METHODS = ("integrated_gradients", "occlusion")
HEAVY_PARAMS = 20_000_000
HEAVY_SIDE = 96


def is_heavy(model: nn.Module, meta: dict[str, Any]) -> bool:
    """Whether integrated gradients, occlusion and deletion/insertion take minutes on a CPU
    (a ViT-B/16 at 224 px does; the CIFAR models at 32 px take seconds)."""
    from visattn.inference import input_size

    on_cpu = next(model.parameters()).device.type == "cpu"
    return on_cpu and (sum(p.numel() for p in model.parameters()) > HEAVY_PARAMS or input_size(meta) > HEAVY_SIDE)


def explain_one(model: nn.Module, tensor: torch.Tensor, method: str, target: int, layer: str | None = None):
    """One ``visattn.explain`` method (``layer``: Grad-CAM's); None when it does not apply
    (attention maps of a model without attention)."""
    from visattn import explain

    fns = {"attention": explain.attention_map, "rollout": explain.rollout, "grad_cam": explain.grad_cam,
           "integrated_gradients": explain.integrated_gradients, "saliency": explain.saliency,
           "occlusion": explain.occlusion}
    if method not in fns:
        raise VisattnError(f"unknown method {method!r}; known: {', '.join(fns)}")
    if method == "grad_cam":
        return fns[method](model, tensor, target, layer=layer)
    if method == "occlusion":  # the patch grows with the image: about 15×15 positions whatever the size
        side = int(tensor.shape[-1])
        return fns[method](model, tensor, target, window=max(4, side // 8), stride=max(2, side // 16))
    return fns[method](model, tensor, target)


def faithfulness_for(model: nn.Module, tensor: torch.Tensor, maps: dict[str, np.ndarray], target: int,
                     steps: int = 16, with_random: bool = True) -> dict[str, dict[str, Any]]:
    """Deletion/insertion curves and AUCs of each (H, W) map for one image (one batched
    call of ``visattn.faithfulness.deletion_insertion``), plus a random map as the floor.

    Returns ``{method: {"deletion_auc", "insertion_auc", "deletion_curve",
    "insertion_curve", "fractions"}}`` with floats and lists.
    """
    from visattn.faithfulness import deletion_insertion, random_map

    maps = dict(maps)
    if with_random:
        maps["random"] = random_map(tuple(tensor.shape[-2:]), seed=0)
    if not maps:
        return {}
    names = list(maps)
    stacked = np.stack([np.nan_to_num(np.asarray(maps[n], dtype=np.float32)) for n in names])
    images = tensor.detach().expand(len(names), -1, -1, -1)
    r = deletion_insertion(model, images, stacked, [int(target)] * len(names), steps=steps)
    fractions = np.asarray(r["fractions"]).tolist()
    return {
        name: {"deletion_auc": float(r["deletion_auc"][i]), "insertion_auc": float(r["insertion_auc"][i]),
               "deletion_curve": np.asarray(r["deletion_curve"][i]).tolist(),
               "insertion_curve": np.asarray(r["insertion_curve"][i]).tolist(), "fractions": fractions}
        for i, name in enumerate(names)
    }


def sanity(model: nn.Module, tensor: torch.Tensor, target: int, method: str,
           layer: str | None = None) -> tuple[list[tuple[str, float]], bool]:
    """Cascading randomisation check of one method (``visattn.faithfulness.sanity_check``):
    ([(layer randomised, Spearman rho)], suspicious flag)."""
    from visattn.faithfulness import sanity_check, sanity_flag

    def run(m: nn.Module) -> np.ndarray:
        e = explain_one(m, tensor, method, target, layer)
        if e is None:
            raise VisattnError(f"{method} does not apply to this model")
        return e.map

    rho = sanity_check(model, tensor, target, run)
    return rho, sanity_flag(rho)


def sanity_figure(rho: list[tuple[str, float]], method: str):
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=[n for n, _ in rho], y=[r for _, r in rho], mode="lines+markers",
                               marker={"size": 10}, name=method))
    fig.add_hline(y=0.5, line_dash="dash", line_color="gray", annotation_text="suspicious above 0.5")
    fig.update_layout(title=f"{METHOD_LABELS.get(method, method)}: similarity to the original map as layers are "
                            "randomised (output first)", yaxis={"title": "Spearman rank correlation",
                                                               "range": [-1, 1.05]},
                      xaxis={"title": "randomised down to layer"}, height=380, font={"size": FONT - 2},
                      margin={"l": 10, "r": 10, "t": 50, "b": 10})
    return fig


def overlay_large(image: np.ndarray, map2d: np.ndarray, alpha: float = 0.5, cmap: str = "inferno",
                  size: int = 256, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """``plotting.overlay`` on the image enlarged to ``size`` px (the map upsampled
    smoothly, the pixels kept sharp), for display."""
    from visattn.plotting import overlay

    return overlay(enlarge(image, size), map2d, alpha, cmap, vmin, vmax)


# ----------------------------------------------------------------------------- Train page
TRAIN_MODELS = ("sa_cnn", "hybrid_vit", "cbam_cnn", "seed_cnn")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,47}")
MAX_EPOCHS = 50
MAX_RUNNING = 1  # background runs started from the dashboard at once (the CPUs are few)
_RUNNING: dict[str, subprocess.Popen] = {}
_RUNNING_LOCK = threading.Lock()


def model_overrides(model: str, width: int, heads: int, similarity: str, pos_encoding: str) -> dict[str, Any]:
    """The ``--set`` config of each trainable model for the Train page's few knobs."""
    if model == "sa_cnn":
        return {"widths": (width, 2 * width, 4 * width), "heads": heads, "similarity": similarity,
                "pos_encoding": pos_encoding}
    if model == "hybrid_vit":
        return {"embed_dim": 4 * width, "heads": heads}
    if model == "cbam_cnn":
        return {"widths": (2 * width, 4 * width, 8 * width), "stem_width": width}
    if model == "seed_cnn":
        return {}
    raise VisattnError(f"cannot train {model!r} here; choose one of {', '.join(TRAIN_MODELS)}")


def train_argv(name: str, model: str = "sa_cnn", epochs: int = 2, width: int = 32, heads: int = 4,
               similarity: str = "dot", pos_encoding: str = "sinusoidal", subset: int = 5000,
               eval_subset: int = 1000, data: str | os.PathLike | None = None,
               python: str = sys.executable) -> list[str]:
    """The command line of a training run writing ``runs/NAME.safetensors`` (validated)."""
    if not RUN_NAME.fullmatch(name or ""):
        raise VisattnError("run name: letters, digits, '-' and '_' only (at most 48)")
    if not 1 <= int(epochs) <= MAX_EPOCHS:
        raise VisattnError(f"epochs must be 1..{MAX_EPOCHS}")
    if model in ("sa_cnn", "hybrid_vit") and (4 * width if model == "hybrid_vit" else 2 * width) % heads:
        raise VisattnError(f"{heads} heads do not divide the attention width")
    argv = [python, "-m", "visattn", "train", "--model", model, "--epochs", str(int(epochs)),
            "--out", str(RUNS_DIR / f"{name}.safetensors"), "--data", str(data or data_path())]
    if subset:
        argv += ["--subset", str(int(subset))]
    if eval_subset:
        argv += ["--eval-subset", str(int(eval_subset))]
    for key, value in model_overrides(model, width, heads, similarity, pos_encoding).items():
        text = "(" + ",".join(str(v) for v in value) + ")" if isinstance(value, tuple) else str(value)
        argv += ["--set", f"{key}={text}"]
    return argv


def run_files(name: str) -> dict[str, Path]:
    """``out``, ``metrics``, ``state`` and ``log`` paths of run ``name`` in ``runs/``."""
    from visattn.train import paths

    p = paths(str(RUNS_DIR / f"{name}.safetensors"))
    return {**p, "log": RUNS_DIR / f"{name}.log"}


def running() -> dict[str, subprocess.Popen]:
    """Runs started from this dashboard process that are still alive, by name."""
    with _RUNNING_LOCK:
        for name in [n for n, p in _RUNNING.items() if p.poll() is not None]:
            del _RUNNING[name]
        return dict(_RUNNING)


def start_training(name: str, argv: Sequence[str]) -> subprocess.Popen:
    """Start ``argv`` as a background process in its own session (process group), its
    output going to ``runs/NAME.log``. At most :data:`MAX_RUNNING` at a time."""
    with _RUNNING_LOCK:
        alive = {n: p for n, p in _RUNNING.items() if p.poll() is None}
        if name in alive:
            raise VisattnError(f"run {name!r} is already going")
        if len(alive) >= MAX_RUNNING:
            raise VisattnError(f"{len(alive)} run(s) already going ({', '.join(alive)}); stop it first")
        files = run_files(name)
        files["log"].parent.mkdir(parents=True, exist_ok=True)
        paths = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}  # visattn importable from the repo
        with open(files["log"], "wb") as log:
            proc = subprocess.Popen(list(argv), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        _RUNNING.clear()
        _RUNNING.update(alive)
        _RUNNING[name] = proc
        return proc


def stop_training(name: str) -> bool:
    """Terminate run ``name``'s process group (SIGTERM, then SIGKILL after 5 s). False if not running."""
    with _RUNNING_LOCK:
        proc = _RUNNING.pop(name, None)
    if proc is None or proc.poll() is not None:
        return False
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # start_new_session: the group id is the pid
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass
    return True


def metric_files() -> dict[str, Path]:
    """``{label: path}`` of every ``*.metrics.jsonl`` in ``runs/`` and ``checkpoints/``, newest first."""
    from visattn.zoo import CHECKPOINT_DIR

    found = [p for folder in (RUNS_DIR, CHECKPOINT_DIR) if folder.is_dir() for p in folder.glob("*.metrics.jsonl")]
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return {f"{p.parent.name}/{p.name.removesuffix('.metrics.jsonl')}": p for p in found}


def read_metrics(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step lines, epoch lines) of a metrics file being written: a half-written last
    line, blank lines and foreign lines are skipped; a missing file gives ([], [])."""
    steps, epochs = [], []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return steps, epochs
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            (epochs if rec.get("type") == "epoch" else steps if rec.get("type") == "step" else []).append(rec)
    return steps, epochs


def tail(path: str | os.PathLike, lines: int = 15, max_bytes: int = 16384) -> str:
    """The last ``lines`` lines of a (log) file, '' if absent; tqdm carriage returns folded."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    rows = [r.rsplit("\r", 1)[-1] for r in data.splitlines()]
    return "\n".join([r for r in rows if r.strip()][-lines:])


# ----------------------------------------------------------------------------- figures (plotly)
FONT = 16  # readable on a projector


def plotly_scale(cmap: str, n: int = 11) -> list[list]:
    """A matplotlib colormap as a plotly colour scale of ``rgb(r,g,b)`` strings.

    (Hex strings such as inferno's ``#000004`` are misread by plotly.js in the browser,
    which paints the low end of the scale pink.)
    """
    import matplotlib

    cm = matplotlib.colormaps[cmap]
    return [[i / (n - 1), "rgb({},{},{})".format(*(round(255 * c) for c in cm(i / (n - 1))[:3]))] for i in range(n)]


def fix_colorscales(fig, cmap: str):
    """Give every heatmap of ``fig`` the :func:`plotly_scale` of ``cmap`` (in place; returns fig)."""
    fig.update_traces(colorscale=plotly_scale(cmap), selector={"type": "heatmap"})
    return fig


def heatmap_figure(m: np.ndarray, title: str, colorbar: str, cell: tuple[int, int] | None = None,
                   cmap: str = "inferno", height: int = 420, text: bool = False, fmt: str = ".2f"):
    """One (H, W) map as a square plotly heatmap with a titled colour bar; ``cell``
    (row, col) is marked with a cyan x; ``text`` writes each value in its cell."""
    import plotly.graph_objects as go

    m = np.asarray(m, dtype=np.float64)
    hm = go.Heatmap(z=m, colorscale=plotly_scale(cmap), colorbar={"title": {"text": colorbar, "side": "right"}},
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
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

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
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

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
    import plotly.graph_objects as go

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
    import plotly.graph_objects as go

    p = np.asarray(per_class, dtype=np.float64) * 100
    fig = go.Figure(go.Bar(x=list(classes), y=p, text=[f"{v:.0f}%" for v in p], textposition="auto"))
    fig.update_layout(title="accuracy per class", yaxis={"title": "accuracy (%)", "range": [0, 100]}, height=360,
                      font={"size": FONT - 2}, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig


def head_stats_figure(stats: dict[str, dict[str, np.ndarray]]):
    """Per-head entropy (left) and mean attention distance (right) by layer, one marker per head."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

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
