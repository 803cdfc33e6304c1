"""Attention maths on captured sites: per-query maps, rollout and head statistics.

Everything returns NumPy arrays and nothing here draws. Rows come from the site
itself (its kept weights, or on demand from Q and K a block of queries at a time),
so a site whose N×N weights were not kept never gets them built here, except by
:func:`rollout`, whose result is N×N by definition (heads fused first).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from visattn.sites import AttentionSite
from visattn.tracing import Trace

HEAD_FUSIONS = ("mean", "max", "min")
_CHUNK = 128  # queries per block when rows are computed on demand
_FUSE = {"mean": lambda t: t.mean(0), "max": lambda t: t.amax(0), "min": lambda t: t.amin(0)}


def _np(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _to_grid(site: AttentionSite, rows: Tensor) -> Tensor:
    """(..., N) -> (..., H, W): drop the prefix keys and fold the grid keys row-major."""
    return rows[..., site.prefix :].reshape(*rows.shape[:-1], *site.grid)


def _batches(site: AttentionSite, b: int | None) -> range:
    return range(site.q.shape[0]) if b is None else range(b, b + 1)


def _row_blocks(site: AttentionSite, b: int, start: int = 0) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(first query, rows (heads, Q, N))`` for queries ``start..N-1``, a block at a time."""
    n = site.q.shape[2]
    step = n if site.weights is not None else _CHUNK
    for s in range(start, n, step):
        stop = min(s + step, n)
        yield s, site.rows(b, s, stop).float()


def query_maps(site: AttentionSite, b: int, query: int) -> dict[str, np.ndarray]:
    """Per-head grid maps (heads, H, W) of one query token against every grid key.

    Keys: ``"attention"`` (the layer's real weights row, bias and temperature
    included), ``"dot"`` (raw q·k), ``"cosine"`` (cos(q, k)), ``"softmax"``
    (softmax(q·k/√d_k), the textbook formula whatever the layer uses) and
    ``"attention_mean"`` (H, W), the head mean. Softmaxes run over all N keys; the
    prefix columns are dropped afterwards. ``query`` counts prefix tokens.

    >>> maps = query_maps(trace.attention["stages.1.1"], b=0, query=27)
    >>> maps["attention"].shape, maps["attention_mean"].shape
    ((4, 8, 8), (8, 8))
    """
    n = site.q.shape[2]
    if not 0 <= query < n:
        raise IndexError(f"query {query} outside 0..{n - 1}")
    q, k = site.q[b, :, query].float(), site.k[b].float()  # (h, d), (h, N, d)
    dot = torch.einsum("hd,hnd->hn", q, k)
    cosine = torch.einsum("hd,hnd->hn", F.normalize(q, dim=-1), F.normalize(k, dim=-1))
    rows = {
        "attention": site.row(b, query).float(),
        "dot": dot,
        "cosine": cosine,
        "softmax": (dot / math.sqrt(q.shape[-1])).softmax(-1),
    }
    maps = {name: _np(_to_grid(site, r)) for name, r in rows.items()}
    maps["attention_mean"] = maps["attention"].mean(0)
    return maps


def received_attention(site: AttentionSite, b: int = 0) -> np.ndarray:
    """(heads, H, W): the attention each grid token receives, averaged over the grid
    queries (prefix tokens left out as queries and as keys); ``.mean(0)`` is the head mean.
    Rows come a block at a time, so a site over the memory budget never holds all of them.

    >>> received_attention(trace.attention["stages.1.1"]).shape
    (4, 8, 8)
    """
    total = torch.zeros(site.heads, site.q.shape[2])
    for _, rows in _row_blocks(site, b, start=site.prefix):
        total += rows.sum(1).cpu()
    return _np(_to_grid(site, total / max(site.q.shape[2] - site.prefix, 1)))


def grid_index(site: AttentionSite, y: float, x: float) -> int:
    """Token index (prefix included) of the grid cell under a click at relative (y, x).

    >>> grid_index(vit_site, 0.0, 0.0), grid_index(vit_site, 0.99, 0.99)  # 4×4 grid + CLS
    (1, 16)
    """
    if not (0.0 <= y <= 1.0 and 0.0 <= x <= 1.0):
        raise ValueError(f"relative position ({y}, {x}) outside [0, 1]")
    h, w = site.grid
    return site.prefix + min(int(y * h), h - 1) * w + min(int(x * w), w - 1)


def _as_sites(trace_or_sites: Trace | Mapping[str, AttentionSite] | Iterable[AttentionSite]) -> list[AttentionSite]:
    if isinstance(trace_or_sites, Trace):
        trace_or_sites = trace_or_sites.attention
    if isinstance(trace_or_sites, Mapping):
        trace_or_sites = trace_or_sites.values()
    sites = [s for s in trace_or_sites if isinstance(s, AttentionSite)]
    if not sites:
        raise ValueError("no attention sites to roll out")
    return sites


def _deepest_run(sites: list[AttentionSite]) -> list[AttentionSite]:
    """The trailing run of consecutive sites with the last site's token count."""
    n = sites[-1].q.shape[2]
    start = len(sites) - 1
    while start > 0 and sites[start - 1].q.shape[2] == n:
        start -= 1
    return sites[start:]


def _fused(site: AttentionSite, b: int, head_fusion: str, add_residual: bool, discard_ratio: float) -> Tensor:
    """One layer's step of the rollout: fused heads, pruned, plus identity, row-normalised (N, N)."""
    a = torch.cat([_FUSE[head_fusion](rows) for _, rows in _row_blocks(site, b)], dim=0)
    n = a.shape[-1]
    drop = min(int(n * discard_ratio), n - 1)
    if drop:
        a = a.scatter(-1, a.topk(drop, dim=-1, largest=False).indices, 0.0)
    if add_residual:
        a = 0.5 * a + 0.5 * torch.eye(n)
    return a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)


def rollout(
    trace_or_sites: Trace | Mapping[str, AttentionSite] | Iterable[AttentionSite],
    b: int = 0,
    head_fusion: str = "mean",
    add_residual: bool = True,
    discard_ratio: float = 0.0,
) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020): joint attention (N, N) of the deepest layers.

    Per layer: fuse heads (``"mean"``, ``"max"``, ``"min"``), zero the smallest
    ``discard_ratio`` of each row, take 0.5·A + 0.5·I when ``add_residual``,
    renormalise rows; then multiply the layers in order (deepest on the left). Only
    the trailing run of consecutive sites with the same token count takes part.

    >>> joint = rollout(hybrid_trace, b=0)  # hybrid_vit on 32×32: 64 tokens
    >>> joint.shape, bool(np.allclose(joint.sum(-1), 1.0, atol=1e-5))
    ((64, 64), True)
    """
    if head_fusion not in _FUSE:
        raise ValueError(f"head_fusion {head_fusion!r} not one of {HEAD_FUSIONS}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio {discard_ratio} outside [0, 1)")
    joint: Tensor | None = None
    for site in _deepest_run(_as_sites(trace_or_sites)):
        a = _fused(site, b, head_fusion, add_residual, discard_ratio)
        joint = a if joint is None else a @ joint
    assert joint is not None
    return _np(joint)


def rollout_map(
    trace_or_sites: Trace | Mapping[str, AttentionSite] | Iterable[AttentionSite],
    b: int = 0,
    head_fusion: str = "mean",
    add_residual: bool = True,
    discard_ratio: float = 0.0,
) -> np.ndarray:
    """Rollout as a (H, W) map in [0, 1]: the CLS row over grid tokens, or the column mean.

    >>> rollout_map(hybrid_trace, b=0).shape  # hybrid_vit on 32×32
    (8, 8)
    """
    sites = _as_sites(trace_or_sites)
    last = sites[-1]
    joint = torch.from_numpy(rollout(sites, b, head_fusion, add_residual, discard_ratio))
    row = joint[0] if last.prefix > 0 else joint.mean(0)
    return normalise(_np(_to_grid(last, row)))


def head_entropy(site: AttentionSite, b: int | None = None) -> np.ndarray:
    """Mean row entropy per head in nats (heads,), over all queries (and images if b is None).

    Uniform attention over N tokens gives log N; attention to a single token gives 0.

    >>> head_entropy(site).shape
    (4,)
    """
    total, count = torch.zeros(site.heads), 0
    for bi in _batches(site, b):
        for _, rows in _row_blocks(site, bi):
            total += -torch.special.xlogy(rows, rows).sum(-1).sum(-1)
            count += rows.shape[1]
    return _np(total / count)


def _grid_positions(grid: tuple[int, int]) -> Tensor:
    """(H·W, 2) row-major (y, x) cell coordinates."""
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], dim=-1).float()


def mean_attention_distance(site: AttentionSite, b: int | None = None, cell_size: float = 1.0) -> np.ndarray:
    """Attention-weighted mean query-to-key distance per head (heads,), in cells × ``cell_size``.

    Grid queries and grid keys only (prefix dropped, each row renormalised over the
    grid keys), averaged over queries (and images if b is None), as in the ViT paper.

    >>> mean_attention_distance(site, cell_size=4.0).shape  # 4 pixels per cell
    (4,)
    """
    pos = _grid_positions(site.grid)
    total, count = torch.zeros(site.heads), 0
    for bi in _batches(site, b):
        for s, rows in _row_blocks(site, bi, start=site.prefix):
            p = rows[..., site.prefix :]  # (h, Q, G)
            p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
            first = s - site.prefix
            dist = torch.cdist(pos[first : first + p.shape[1]], pos)  # (Q, G)
            total += (p * dist).sum(-1).sum(-1)
            count += p.shape[1]
    return _np(total / count * cell_size)


def upsample(map2d: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (H, W) token map to ``size`` (height, width), float32.

    >>> upsample(np.eye(2), (4, 4)).shape
    (4, 4)
    """
    t = torch.as_tensor(np.asarray(map2d, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


def normalise(m: np.ndarray) -> np.ndarray:
    """Min–max scale to [0, 1] as float32; a constant (or empty) map gives zeros.

    >>> normalise(np.array([2.0, 4.0, 3.0])).tolist()
    [0.0, 1.0, 0.5]
    """
    m = np.asarray(m, dtype=np.float32)
    if m.size == 0:
        return m
    lo, hi = float(np.min(m)), float(np.max(m))
    if not np.isfinite(hi - lo) or hi - lo <= 0.0:
        return np.zeros_like(m)
    return (m - lo) / (hi - lo)
