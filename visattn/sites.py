"""Attention sites: the one dispatch point for attention, and what it records.

Every attention layer visattn sees calls :func:`attend` (its own layers directly; other
libraries' layers through :mod:`visattn.intercept`). Nobody watches during training and
plain inference, so :func:`attend` takes the fused SDPA path. While a :class:`Recorder` is
active in this thread (:func:`recording`, used by :func:`visattn.capture`), it computes the
weights explicitly and records an :class:`AttentionSite`; while an edit is active
(:func:`edited`, used by :func:`visattn.tracing.editing`), the head outputs pass through it;
while a rescale is active (:func:`rescaled`, used by :func:`visattn.breaking.broken`), the
scale of the logits is its. All three live in ``contextvars``: each thread (each Streamlit
session) sees only its own.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from visattn.tokens import TokenLayout

#: Attention matrices larger than this (bytes, all heads, whole batch) are not kept;
#: their rows are computed on demand from Q and K instead.
DEFAULT_BUDGET_BYTES = 256 * 1024 * 1024

_RECORDER: contextvars.ContextVar["Recorder | None"] = contextvars.ContextVar(
    "visattn_recorder", default=None
)

#: ``edit(module, out) -> out``: sees (and may replace) each attention layer's head outputs
#: (B, heads, N, d_v) before the output projection.
HeadEdit = Callable[[nn.Module, Tensor], Tensor]
_EDIT: contextvars.ContextVar["HeadEdit | None"] = contextvars.ContextVar("visattn_edit", default=None)

#: ``rescale(module, scale, d_k, similarity) -> scale``: the scale of each attention layer's
#: logits (1/√d_k for "dot", the learned temperature for "cosine") as this thread runs it.
ScaleEdit = Callable[[nn.Module, "float | Tensor", int, str], "float | Tensor"]
_RESCALE: contextvars.ContextVar["ScaleEdit | None"] = contextvars.ContextVar("visattn_rescale", default=None)


@dataclass
class AttentionSite:
    """What one self-attention layer saw and did for a batch.

    Shapes: ``q``, ``k`` (B, heads, N, d_k); ``v`` (B, heads, N, d_v);
    ``weights`` (B, heads, N, N) or ``None`` when over the memory budget.
    ``prefix`` tokens (CLS, extra) come before the ``grid`` tokens in row-major order.
    """

    name: str
    q: Tensor
    k: Tensor
    v: Tensor
    weights: Tensor | None
    similarity: str  # "dot" or "cosine"
    scale: float  # 1/sqrt(d_k) for dot, the learned temperature for cosine
    bias: Tensor | None  # (heads, N, N) additive logit bias (relative positions)
    grid: tuple[int, int]
    prefix: int = 0
    context: Tensor | None = None  # (B, N, C): the attention output after projection
    inputs: Tensor | None = None  # (B, N, C): what Q, K and V were computed from
    outputs: Tensor | None = None  # (B, N, C): after the residual add, when the layer has one
    gate: float = 1.0  # weight of `context` in `outputs = inputs + gate * context`
    kind: str = "attention"

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    def logit_rows(self, b: int, start: int, stop: int) -> Tensor:
        """Pre-softmax scores of queries ``start..stop-1`` against every key: (heads, Q, N)."""
        q, k = self.q[b, :, start:stop], self.k[b]  # (h, Q, d), (h, N, d)
        if self.similarity == "cosine":
            q = torch.nn.functional.normalize(q, dim=-1)
            k = torch.nn.functional.normalize(k, dim=-1)
        s = torch.einsum("hqd,hnd->hqn", q.float(), k.float()) * self.scale
        if self.bias is not None:
            s = s + self.bias[:, start:stop].float()
        return s

    def logits(self, b: int, query: int) -> Tensor:
        """Pre-softmax scores of one query against every key: (heads, N)."""
        return self.logit_rows(b, query, query + 1)[:, 0]

    def rows(self, b: int, start: int = 0, stop: int | None = None) -> Tensor:
        """Attention weights of queries ``start..stop-1`` (default: all) over every key:
        (heads, Q, N); the kept weights, or computed from Q and K when over the budget."""
        stop = self.q.shape[2] if stop is None else stop
        if self.weights is not None:
            return self.weights[b, :, start:stop]
        return self.logit_rows(b, start, stop).softmax(-1)

    def row(self, b: int, query: int) -> Tensor:
        """Attention weights of one query over all keys, per head: (heads, N)."""
        return self.rows(b, query, query + 1)[:, 0]

    def full_weights(self, b: int) -> Tensor:
        """All weights of image ``b``: (heads, N, N), computed on demand if not kept."""
        return self.rows(b)


@dataclass
class ChannelSite:
    """Squeeze-and-excitation output: one weight in (0, 1) per channel, (B, C)."""

    name: str
    weights: Tensor
    kind: str = "channel"


@dataclass
class SpatialSite:
    """CBAM spatial attention map in (0, 1): (B, 1, H, W)."""

    name: str
    map: Tensor
    kind: str = "spatial"


Site = AttentionSite | ChannelSite | SpatialSite


class Recorder:
    """Collects sites during one captured forward pass (one per thread and call); ``layout``:
    the model's token layout; ``skipped``: ``{layer: reason}`` for attention calls it saw
    but could not record."""

    def __init__(self, names: dict[int, str], budget_bytes: int, *, layout: TokenLayout | None = None,
                 image_hw: tuple[int, int] = (0, 0)) -> None:
        self.names = names
        self.budget_bytes = budget_bytes
        self.layout, self.image_hw = layout, image_hw
        self.sites: dict[str, Site] = {}
        self.skipped: dict[str, str] = {}

    def name_of(self, module: nn.Module) -> str:
        return self.names.get(id(module), f"{type(module).__name__}@{id(module):x}")

    def keep_weights(self, b: int, h: int, n: int) -> bool:
        return b * h * n * n * 4 <= self.budget_bytes

    def add(self, site: Site) -> None:
        self.sites[site.name] = site


def current_recorder() -> Recorder | None:
    """The recorder of the capture running in this thread, or ``None``."""
    return _RECORDER.get()


@contextlib.contextmanager
def _set(var: contextvars.ContextVar, value) -> Iterator:
    """``var`` set to ``value`` in this thread inside the ``with`` block."""
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


def recording(rec: Recorder) -> contextlib.AbstractContextManager[Recorder]:
    """Make ``rec`` this thread's recorder inside the ``with`` block."""
    return _set(_RECORDER, rec)


def edited(edit: HeadEdit) -> contextlib.AbstractContextManager[HeadEdit]:
    """Make ``edit`` this thread's head-output edit inside the ``with`` block."""
    return _set(_EDIT, edit)


def rescaled(rescale: ScaleEdit) -> contextlib.AbstractContextManager[ScaleEdit]:
    """Make ``rescale`` this thread's logit-scale edit inside the ``with`` block."""
    return _set(_RESCALE, rescale)


def current_edit() -> HeadEdit | None:
    """The head-output edit active in this thread, or ``None``."""
    return _EDIT.get()


def current_rescale() -> ScaleEdit | None:
    """The logit-scale edit active in this thread, or ``None``."""
    return _RESCALE.get()


def attend(
    module: nn.Module,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    similarity: str,
    scale: float | Tensor,
    bias: Tensor | None,
    grid: tuple[int, int],
    prefix: int = 0,
) -> Tensor:
    """softmax(sim(Q, K) * scale + bias) V: fused when unobserved (unless :func:`fused_is_faster` says
    otherwise), explicit when captured; the scale passes through the thread's rescale and the head
    outputs through its edit, if any (:func:`rescaled`, :func:`edited`).

    q, k: (B, h, N, d_k); v: (B, h, N, d_v); bias: (h, N, N). Returns (B, h, N, d_v).
    """
    rescale = _RESCALE.get()
    if rescale is not None:
        scale = rescale(module, scale, q.shape[-1], similarity)
    if similarity == "cosine":
        qs, ks = nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)
    else:
        qs, ks = q, k
    rec = current_recorder()
    b, h, n, _ = q.shape
    keep = rec is not None and rec.keep_weights(b, h, n)
    if not keep and fused_is_faster(q):
        # SDPA wants a float scale; a learned temperature is folded into q instead.
        if isinstance(scale, Tensor):
            qs, s = qs * scale, 1.0
        else:
            s = scale
        attn_mask = None if bias is None else bias.to(qs.dtype).unsqueeze(0)
        out = nn.functional.scaled_dot_product_attention(qs, ks, v, attn_mask=attn_mask, scale=s)
        weights = None
    else:
        logits = (qs @ ks.transpose(-2, -1)) * scale  # (B, h, N, N)
        if bias is not None:
            logits = logits + bias
        weights = logits.softmax(dim=-1)
        out = weights @ v  # (B, h, N, d_v)
        weights = weights if keep else None
    edit = current_edit()
    if edit is not None:
        out = edit(module, out)
    if rec is not None:
        rec.add(
            AttentionSite(
                name=rec.name_of(module), q=q, k=k, v=v, weights=weights,
                similarity=similarity, scale=float(scale.detach() if isinstance(scale, Tensor) else scale), bias=bias, grid=grid, prefix=prefix,
            )
        )
    return out


def fused_is_faster(q: Tensor) -> bool:
    """Whether the fused SDPA kernel beats the explicit form for these queries.

    Everywhere but one case: bf16 training on CPU, where PyTorch's CPU flash kernel runs
    forward + backward 3.5-5.3x slower than matmul-softmax-matmul at 64 tokens (its math
    backend 2.4-3.4x; ``benchmarks/run.py`` measures both).
    """
    return not (q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad)


def record_extras(module: nn.Module, **fields: object) -> None:
    """Attach block-level tensors (inputs, context, outputs, gate) to the module's site."""
    rec = current_recorder()
    if rec is None:
        return
    site = rec.sites.get(rec.name_of(module))
    if isinstance(site, AttentionSite):
        for key, value in fields.items():
            setattr(site, key, value)


def record_site(site_factory, module: nn.Module, value: Tensor) -> None:
    """Record a channel or spatial attention output of ``module`` when capturing."""
    rec = current_recorder()
    if rec is not None:
        rec.add(site_factory(rec.name_of(module), value.detach()))


def default_scale(d_k: int) -> float:
    return 1.0 / math.sqrt(d_k)
