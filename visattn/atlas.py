"""A data-set atlas of queries and keys (AttentionViz, Yeh et al., IEEE VIS 2023).

For every attention layer and head, the query and key vectors of the tokens of many
images are embedded together in 2D, so that a head's "questions" and "answers" show as
clusters. Before embedding, the keys are moved by the two operations a softmax cannot
see (:func:`normalise_qk`): every query's scores change by a constant, so every
attention row stays the same, while the Euclidean distance between a query and a key
comes to track their dot product. Per head, ``corr`` is the Pearson correlation between
q·k and minus the 2D distance over sampled query-key pairs (1 would be perfect).

Steps: :func:`extract` (sharded over ``torchrun`` processes, same result as one
process), :func:`normalise_qk`, :func:`embed`, :func:`qk_correlation`;
:func:`build_atlas` does them all and caches the result on disk.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from visattn.errors import VisattnError
from visattn.sites import AttentionSite
from visattn.tracing import capture

VERSION = 2  # bump when the cached content changes meaning
DEFAULT_MAX_TOKENS = 4096  # tokens sampled per layer (each gives one query and one key point)
DEFAULT_PAIRS = 20_000  # query-key pairs sampled for ``corr``
THUMB = 64  # largest side of the image thumbnails kept in the atlas (hover, click)


# ----------------------------------------------------------------------------- extraction
@dataclass
class LayerTokens:
    """Sampled tokens of one attention layer: ``q``, ``k`` (M, heads, d_k) float32, the
    image each came from (M,) and its token index (M,), prefix tokens first then the grid
    row-major; ``similarity`` is the layer's ("dot" or "cosine")."""

    name: str
    q: Tensor
    k: Tensor
    image: Tensor
    token: Tensor
    grid: tuple[int, int]
    prefix: int
    similarity: str

    @property
    def heads(self) -> int:
        return self.q.shape[1]


def sample_tokens(n_images: int, n_tokens: int, max_tokens: int, seed: int) -> Tensor:
    """Sorted flat indices (image * n_tokens + token) of at most ``max_tokens`` tokens,
    a fixed random sample (every token when there are fewer).

    >>> sample_tokens(2, 3, 10, seed=0).tolist()
    [0, 1, 2, 3, 4, 5]
    >>> len(sample_tokens(1000, 64, 4096, seed=0))
    4096
    """
    total = n_images * n_tokens
    if total <= max_tokens:
        return torch.arange(total)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=g)[:max_tokens].sort().values


def _shard(n_batches: int, rank: int, world: int) -> range:
    """Batches of this process: every ``world``-th one, starting at ``rank``."""
    return range(rank, n_batches, world)


def _gather(parts: list[tuple[int, dict[str, dict[str, Tensor]]]], world: int) -> list:
    """Every process's ``(batch, tensors)`` list, in batch order (one process: as is)."""
    if world == 1:
        return parts
    everything: list[Any] = [None] * world
    dist.all_gather_object(everything, parts)
    return sorted((p for ps in everything for p in ps), key=lambda p: p[0])


@torch.no_grad()
def extract(model: nn.Module, images: Tensor, *, max_tokens: int = DEFAULT_MAX_TOKENS, seed: int = 0,
            batch_size: int = 250, rank: int = 0, world: int = 1) -> dict[str, LayerTokens]:
    """Q and K of a fixed sample of tokens of ``images`` (normalised (B, 3, S, S)), per layer.

    At most ``max_tokens`` (image, token) pairs per layer, drawn by :func:`sample_tokens`.
    With ``world`` > 1 (under ``torchrun``, see :func:`visattn.train.dist_info`) each
    process runs every ``world``-th batch and the pieces are gathered in batch order:
    the same batches as one process, so the same numbers.

    >>> from visattn import create_model
    >>> model = create_model("sa_cnn", widths=(8, 16, 16), heads=2).eval()
    >>> layers = extract(model, torch.randn(3, 3, 32, 32), max_tokens=100)
    >>> {n: tuple(t.q.shape) for n, t in layers.items()}  # 2 heads of 8 dims
    {'stages.1.1': (100, 2, 8)}
    """
    device = next(model.parameters()).device
    n = len(images)
    n_batches = (n + batch_size - 1) // batch_size
    samples: dict[str, Tensor] = {}
    info: dict[str, AttentionSite] = {}
    parts = []
    for bi in _shard(n_batches, rank, world):
        start = bi * batch_size
        x = images[start : start + batch_size].to(device)
        trace = capture(model, x, budget_bytes=0)
        out = {}
        for name, site in trace.attention.items():
            tokens = site.q.shape[2]
            if name not in samples:
                samples[name] = sample_tokens(n, tokens, max_tokens, seed + len(samples))
                info[name] = site
            flat = samples[name]
            flat = flat[(flat >= start * tokens) & (flat < (start + len(x)) * tokens)]
            b, t = flat // tokens - start, flat % tokens
            out[name] = {"q": site.q[b, :, t].float().cpu(), "k": site.k[b, :, t].float().cpu(), "image": b + start,
                         "token": t}
        parts.append((bi, out))
    gathered = _gather(parts, world)
    if not gathered or not gathered[0][1]:
        raise VisattnError("this model has no self-attention layers: there are no queries and keys to map")
    layers = {}
    for name in gathered[0][1]:
        cat = {key: torch.cat([p[1][name][key] for p in gathered]) for key in ("q", "k", "image", "token")}
        site = info.get(name)
        grid, prefix, sim = (site.grid, site.prefix, site.similarity) if site is not None else \
            _site_shape(model, images)[name][:3]
        layers[name] = LayerTokens(name, cat["q"], cat["k"], cat["image"], cat["token"], tuple(grid), prefix, sim)
    return layers


def _site_shape(model: nn.Module, images: Tensor) -> dict[str, tuple[tuple[int, int], int, str, int]]:
    """(grid, prefix, similarity, heads) per attention layer, from one image."""
    trace = capture(model, images[:1].to(next(model.parameters()).device), budget_bytes=0)
    return {n: (s.grid, s.prefix, s.similarity, s.heads) for n, s in trace.attention.items()}


def chosen_heads(shapes: dict[str, tuple], layer: str | None, head: int | None) -> list[tuple[str, int]]:
    """(layer, head) pairs to embed: every head of every layer, of ``layer``, or one head.

    >>> chosen_heads({"a": ((8, 8), 0, "dot", 2), "b": ((4, 4), 0, "dot", 2)}, "b", None)
    [('b', 0), ('b', 1)]
    """
    if not shapes:
        raise VisattnError("this model has no self-attention layers: there are no queries and keys to map")
    if layer is not None and layer not in shapes:
        raise VisattnError(f"no attention layer {layer!r}; this model's: {', '.join(shapes)}")
    if head is not None:
        if layer is None:
            raise VisattnError("--head needs --layer")
        if not 0 <= head < shapes[layer][3]:
            raise VisattnError(f"layer {layer} has heads 0..{shapes[layer][3] - 1}, not {head}")
    return [(name, h) for name, shp in shapes.items() if layer in (None, name)
            for h in range(shp[3]) if head in (None, h)]


# ----------------------------------------------------------------------------- AttentionViz normalisation
def normalise_qk(q: Tensor, k: Tensor, similarity: str = "dot") -> tuple[Tensor, Tensor]:
    """Queries and keys of one head made comparable by distance, softmax unchanged.

    AttentionViz's two free parameters: (1) scale, q -> c·q and k -> k/c with
    c = sqrt(mean |k| / mean |q|), so both sets have the same mean norm and every q·k is
    unchanged; (2) translate every key by the same vector, mean(q) - mean(k), so the two
    centroids coincide; a query's scores all change by one constant (q·v), so its
    softmax row does not change. Cosine-similarity heads use unit vectors first (what
    their scores are made of). q: (Mq, d), k: (Mk, d).

    >>> q, k = normalise_qk(torch.randn(50, 8) * 3, torch.randn(40, 8) + 5)
    >>> bool(torch.allclose(q.mean(0), k.mean(0), atol=1e-5))
    True
    """
    q, k = q.double(), k.double()
    if similarity == "cosine":
        q, k = nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)
    c = (k.norm(dim=-1).mean() / q.norm(dim=-1).mean().clamp_min(1e-12)).sqrt()
    q, k = q * c, k / c
    k = k + (q.mean(0) - k.mean(0))
    return q.float(), k.float()


# ----------------------------------------------------------------------------- embedding
METHODS = ("umap", "pca")


def embed(points: np.ndarray, method: str = "umap", seed: int = 0) -> np.ndarray:
    """2D embedding (M, 2) float32 of (M, d) points: UMAP (``umap-learn``, fixed seed) or
    PCA (the linear baseline: the plane of largest variance).

    UMAP rather than t-SNE (``openTSNE``), measured on 2,048 real query + key pairs of the
    default sa_cnn's heads: 20 s a head against 133 s, corr 0.16-0.38 against 0.18
    (README, "Atlas"). UMAP compiles with numba on its first call in a process.

    >>> embed(np.eye(3)[[0, 1, 2, 0]], "pca").shape
    (4, 2)
    """
    x = np.ascontiguousarray(points, dtype=np.float32)
    if method == "pca":
        centred = x - x.mean(0)
        _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
        out = np.zeros((len(x), 2), np.float32)
        out[:, : min(2, len(vt))] = centred @ vt[:2].T
        return out
    if method == "umap":
        import umap  # slow to import (numba): only when needed

        return umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, random_state=seed).fit_transform(x).astype(
            np.float32)
    raise VisattnError(f"unknown embedding {method!r}; use one of {', '.join(METHODS)}")


def sample_pairs(mq: int, mk: int, pairs: int = DEFAULT_PAIRS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(query indices, key indices) of ``pairs`` random pairs, or of every pair when there are fewer.

    >>> [i.tolist() for i in sample_pairs(2, 2)]
    [[0, 0, 1, 1], [0, 1, 0, 1]]
    """
    if mq * mk <= pairs:
        return np.divmod(np.arange(mq * mk), mk)
    rng = np.random.default_rng(seed)
    return rng.integers(0, mq, pairs), rng.integers(0, mk, pairs)


def qk_correlation(q: Tensor | np.ndarray, k: Tensor | np.ndarray, eq: np.ndarray, ek: np.ndarray,
                   pairs: int = DEFAULT_PAIRS, seed: int = 0) -> float:
    """Pearson correlation between q·k and minus the distance of their points over the
    pairs of :func:`sample_pairs`. 1: the nearer a key, the larger its dot product, exactly linearly.

    q: (Mq, d), k: (Mk, d) the vectors; eq: (Mq, e), ek: (Mk, e) their points (the 2D
    embedding, or the vectors themselves).

    >>> u = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # keys = queries = points
    >>> round(qk_correlation(u, u, u, u), 3)  # |q-k|² = 2 - 2q·k: same order, not linear
    0.966
    """
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    eq, ek = np.asarray(eq, np.float64), np.asarray(ek, np.float64)
    i, j = sample_pairs(len(q), len(k), pairs, seed)
    dots = np.einsum("nd,nd->n", q[i], k[j])
    dist = np.linalg.norm(eq[i] - ek[j], axis=1)
    if dots.std() == 0 or dist.std() == 0:
        return 0.0
    return float(np.corrcoef(dots, -dist)[0, 1])


# ----------------------------------------------------------------------------- the atlas
@dataclass
class HeadMap:
    """One head's atlas: ``xy`` (2M, 2), the M queries then the M keys of the layer's
    sampled tokens; raw vector norms ``qnorm``, ``knorm`` (M,); ``corr`` in the 2D map
    and ``corr_full`` in the d-dimensional space (after :func:`normalise_qk`)."""

    layer: str
    head: int
    xy: np.ndarray
    qnorm: np.ndarray
    knorm: np.ndarray
    corr: float
    corr_full: float


@dataclass
class Atlas:
    """Every head's map, the sampled tokens of every layer and the images they came from.

    ``images``: (n, 3, s, s) uint8 thumbnails; ``labels`` (n,); ``indices`` (n,) into the
    data set's split; ``layers``: name -> dict(grid, prefix, similarity, heads, tokens,
    image (M,), token (M,)). ``info``: parameters, sizes and timings.
    """

    heads: list[HeadMap]
    layers: dict[str, dict[str, Any]]
    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    classes: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def head(self, layer: str, head: int) -> HeadMap:
        for h in self.heads:
            if h.layer == layer and h.head == head:
                return h
        raise VisattnError(f"no head {head} of layer {layer!r} in this atlas")

    def summary(self) -> list[dict[str, Any]]:
        """One row per head: layer, head, corr, corr_full, points."""
        return [{"layer": h.layer, "head": h.head, "corr": round(h.corr, 4), "corr_full": round(h.corr_full, 4),
                 "points": int(len(h.xy))} for h in self.heads]


def embed_heads(layers: dict[str, LayerTokens], method: str, seed: int = 0, only: list[tuple[str, int]] | None = None,
                rank: int = 0, world: int = 1) -> list[HeadMap]:
    """Normalise and embed every head of ``layers`` (or the (layer, head) pairs in
    ``only``); with ``world`` > 1 each process embeds every ``world``-th head."""
    todo = [(n, h) for n, t in layers.items() for h in range(t.heads) if only is None or (n, h) in only]
    if not todo:
        raise VisattnError("no head to map")
    mine = []
    for i in _shard(len(todo), rank, world):
        name, h = todo[i]
        t = layers[name]
        q, k = normalise_qk(t.q[:, h], t.k[:, h], t.similarity)
        xy = embed(torch.cat([q, k]).numpy(), method, seed)
        m = len(q)
        mine.append((i, HeadMap(name, h, xy, t.q[:, h].norm(dim=-1).numpy(), t.k[:, h].norm(dim=-1).numpy(),
                                qk_correlation(q, k, xy[:m], xy[m:], seed=seed),
                                qk_correlation(q, k, q.numpy(), k.numpy(), seed=seed))))
    return [hm for _, hm in _gather(mine, world)]


def fingerprint(model: nn.Module, images: Tensor, labels: Tensor, params: dict[str, Any]) -> str:
    """A cache key from the model's weights, the images and labels, and the parameters."""
    h = hashlib.sha256(json.dumps({**params, "version": VERSION}, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for t in (images, labels):
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def thumbnails(images: Tensor, side: int = THUMB) -> np.ndarray:
    """uint8 (n, 3, S, S) shrunk to at most ``side`` px (area averaging)."""
    if images.shape[-1] <= side:
        return images.numpy()
    small = nn.functional.interpolate(images.float(), size=(side, side), mode="area")
    return small.round().clamp(0, 255).to(torch.uint8).numpy()


def build_atlas(model: nn.Module, meta: dict[str, Any], split, *, n: int = 1000, seed: int = 0,
                max_tokens: int = DEFAULT_MAX_TOKENS, method: str = "umap", layer: str | None = None,
                head: int | None = None, cache: str | Path | None = None, refresh: bool = False,
                cached_only: bool = False) -> Atlas | None:
    """The atlas of ``n`` images of ``split`` (a :class:`visattn.data.Split`), from the
    disk cache when the same model weights, images and parameters were mapped before.
    ``layer`` and ``head`` choose the heads to embed (default: every head of every layer).
    ``cached_only``: None instead of computing an atlas that is not cached.

    Under ``torchrun`` the extraction and the embeddings are shared between the
    processes; every process returns the same atlas, the first one writes the cache.

    Example (minutes on a CPU: 1,000 images, UMAP of four heads)::

        model, meta = load_checkpoint("checkpoints/sa_cnn.safetensors")
        atlas = build_atlas(model, meta, load_split(None, "test"), n=1000)
        [(row["layer"], row["head"], row["corr"]) for row in atlas.summary()]
    """
    from visattn.inference import model_inputs
    from visattn.train import dist_info

    if method not in METHODS:
        raise VisattnError(f"unknown embedding {method!r}; use one of {', '.join(METHODS)}")
    if n < 1 or max_tokens < 2:
        raise VisattnError("--n must be at least 1 and --max-tokens at least 2")
    indices = split.sample_indices(n, seed)
    images, labels = split.images[indices], split.labels[indices]
    params = {"n": len(indices), "seed": seed, "max_tokens": max_tokens, "method": method, "layer": layer,
              "head": head}
    key = fingerprint(model, images, labels, params)  # no forward pass: a cached atlas opens at once
    path = cache_path(key, cache)
    if path.exists() and not refresh:
        return load_atlas(path)
    if cached_only:
        return None
    x = model_inputs(images, meta)
    only = chosen_heads(_site_shape(model, x), layer, head)
    rank, world = dist_info()
    t0 = time.perf_counter()
    layers = extract(model, x, max_tokens=max_tokens, seed=seed, rank=rank, world=world)
    t1 = time.perf_counter()
    heads = embed_heads(layers, method, seed, only, rank, world)
    t2 = time.perf_counter()
    atlas = Atlas(
        heads=heads,
        layers={name: {"grid": list(t.grid), "prefix": t.prefix, "similarity": t.similarity, "heads": t.heads,
                       "tokens": (t.grid[0] * t.grid[1] + t.prefix), "image": t.image.numpy(),
                       "token": t.token.numpy()} for name, t in layers.items()},
        images=thumbnails(images), labels=labels.numpy(), indices=indices.numpy(), classes=list(split.classes),
        info={**params, "only": [list(p) for p in only], "key": key, "data": str(split.source),
              "model": meta.get("model"), "processes": world,
              "extract_seconds": round(t1 - t0, 2), "embed_seconds": round(t2 - t1, 2),
              "sampled": {name: len(t.token) for name, t in layers.items()},
              "all_tokens": {name: len(indices) * (t.grid[0] * t.grid[1] + t.prefix) for name, t in layers.items()}},
    )
    if rank == 0:
        save_atlas(atlas, path)
    return atlas


MAX_UPLOADS = 500  # images in an atlas of uploads
UPLOADED = "uploaded images"  # ``Split.source`` of an atlas of uploads


@torch.no_grad()
def split_of_images(files: list[tuple[str, bytes]], model: nn.Module, meta: dict[str, Any]):
    """Uploaded images as a data set for :func:`build_atlas` (a :class:`visattn.data.Split`,
    source ``"uploaded images"``): each checked and cropped as Explore does
    (:func:`visattn.inference.prepare`), labelled with the model's predicted class.
    A bad file raises one line naming it.
    """
    from visattn.data import Split
    from visattn.inference import model_inputs, prepare

    if not files:
        raise VisattnError("no images: upload at least one")
    if len(files) > MAX_UPLOADS:
        raise VisattnError(f"{len(files)} images: an atlas of uploads takes at most {MAX_UPLOADS}")
    images = []
    for name, data in files:
        try:
            images.append(torch.from_numpy(prepare(data, meta)[0]).permute(2, 0, 1))
        except VisattnError as e:
            raise type(e)(f"{name}: {e}") from None
    x = torch.stack(images)
    device = next(model.parameters()).device
    labels = torch.cat([model(b.to(device)).argmax(-1).cpu() for b in model_inputs(x, meta).split(100)])
    return Split(x.contiguous(), labels, tuple(meta["classes"]), UPLOADED)


def cache_path(key: str, cache: str | Path | None = None) -> Path:
    """Where the atlas with this key is cached: ``<cache dir>/atlas/<key>.safetensors``."""
    from visattn.data import cache_dir

    return cache_dir(cache) / "atlas" / f"{key}.safetensors"


def save_atlas(atlas: Atlas, path: str | Path) -> None:
    """Write an atlas as one safetensors file (tensors + JSON), atomically."""
    from visattn.checkpoint import atomic_write, tensors_to_bytes

    tensors = {"images": torch.from_numpy(atlas.images), "labels": torch.from_numpy(atlas.labels),
               "indices": torch.from_numpy(atlas.indices)}
    layers = {}
    for name, lay in atlas.layers.items():
        tensors[f"{name}/image"] = torch.from_numpy(np.asarray(lay["image"]))
        tensors[f"{name}/token"] = torch.from_numpy(np.asarray(lay["token"]))
        layers[name] = {k: v for k, v in lay.items() if k not in ("image", "token")}
    heads = []
    for h in atlas.heads:
        for part in ("xy", "qnorm", "knorm"):
            tensors[f"{h.layer}/{h.head}/{part}"] = torch.from_numpy(np.asarray(getattr(h, part), np.float32))
        heads.append({"layer": h.layer, "head": h.head, "corr": h.corr, "corr_full": h.corr_full})
    meta = {"layers": layers, "heads": heads, "classes": atlas.classes, "info": atlas.info}
    atomic_write(path, tensors_to_bytes(tensors, meta))


def load_atlas(path: str | Path) -> Atlas:
    """Read an atlas written by :func:`save_atlas`."""
    from safetensors.numpy import load

    from visattn.checkpoint import read_header

    data = Path(path).read_bytes()
    _, meta = read_header(data)
    t = load(data)
    meta["info"]["from_cache"] = str(path)
    layers = {name: {**lay, "image": t[f"{name}/image"], "token": t[f"{name}/token"]}
              for name, lay in meta["layers"].items()}
    heads = [HeadMap(h["layer"], h["head"], t[f"{h['layer']}/{h['head']}/xy"], t[f"{h['layer']}/{h['head']}/qnorm"],
                     t[f"{h['layer']}/{h['head']}/knorm"], h["corr"], h["corr_full"]) for h in meta["heads"]]
    return Atlas(heads, layers, t["images"], t["labels"], t["indices"], meta["classes"], meta["info"])
