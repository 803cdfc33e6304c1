"""Exact attention capture, safe to run from many threads on one shared model.

Attention modules ask :func:`current_recorder` whether anyone is watching. Nobody is
during training and plain inference, so they take the fused SDPA path. Inside
:func:`capture` a fresh :class:`Recorder` lives in a ``contextvars.ContextVar``: each
thread (each Streamlit session) sees only its own, so two users capturing on one cached
model never mix their maps, and no hook or recorder is left on the model.

The same dispatch carries interventions: inside :func:`editing` an edit function sees every
head output (``weights @ V``, before the output projection) and may replace it, again for
the calling thread only (``visattn.ablation`` builds head ablation and patching on it).

Attention computed by other libraries (any ``nn.MultiheadAttention``, timm's and Hugging
Face's attention modules) is routed through :func:`attend` by :mod:`visattn.intercept`, for
the capturing (or editing) thread only: nothing on the model changes, not even a class.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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


class CaptureWarning(UserWarning):
    """An attention layer whose weights a capture could not see (named, with the reason)."""


@dataclass
class Trace:
    """Logits of a forward pass and every attention site it went through, by layer name;
    ``skipped``: ``{layer: reason}`` for attention layers it could not see."""

    logits: Tensor
    sites: dict[str, Site] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor storage this trace keeps alive: the logits and every site's tensors,
        a storage shared by several of them (Q, K and V cut from one projection) counted once."""
        storages = {}
        for t in [self.logits, *(v for s in self.sites.values() for v in vars(s).values())]:
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                storages[(t.device, storage.data_ptr())] = storage.nbytes()
        return sum(storages.values())

    @property
    def attention(self) -> dict[str, AttentionSite]:
        return {n: s for n, s in self.sites.items() if isinstance(s, AttentionSite)}

    @property
    def channel(self) -> dict[str, ChannelSite]:
        return {n: s for n, s in self.sites.items() if isinstance(s, ChannelSite)}

    @property
    def spatial(self) -> dict[str, SpatialSite]:
        return {n: s for n, s in self.sites.items() if isinstance(s, SpatialSite)}


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
def editing(edit: HeadEdit) -> Iterator[None]:
    """Apply ``edit`` to every head output computed by :func:`attend` in this thread, inside
    the ``with`` block only (other threads on the same model are not affected).

    >>> from visattn import create_model
    >>> model = create_model("hybrid_vit", depth=1).eval()
    >>> with editing(lambda module, out: out * 0), torch.no_grad():  # every head silenced
    ...     logits = model(torch.rand(1, 3, 32, 32))
    >>> tuple(logits.shape)
    (1, 10)
    """
    from visattn.intercept import watching

    token = _EDIT.set(edit)
    try:
        with watching():
            yield
    finally:
        _EDIT.reset(token)


def capture(
    model: nn.Module, images: Tensor, *, budget_bytes: int = DEFAULT_BUDGET_BYTES, grad: bool = False,
    layout: TokenLayout | None = None,
) -> Trace:
    """Run ``model`` on ``images`` and return its logits with every attention map.

    Sees visattn's own layers, every ``nn.MultiheadAttention`` and timm's and Hugging
    Face's attention (:mod:`visattn.intercept`); each attention layer it cannot see is
    named in one :class:`CaptureWarning` and in ``Trace.skipped``. Token layouts come from
    the model (:func:`visattn.tokens.token_layout`) unless ``layout`` is given. A Hugging
    Face model's output object gives its ``logits``.

    Thread-safe on a shared model: no hook, state or class change is left on it. With
    ``grad`` the autograd graph is kept, so the logits can be differentiated with respect to
    the sites' tensors (``torch.autograd.grad``; no parameter ``.grad`` is touched).

    >>> from visattn import create_model
    >>> model = create_model("sa_cnn", widths=(8, 16, 16), heads=2).eval()
    >>> trace = capture(model, torch.randn(1, 3, 32, 32))
    >>> {name: tuple(s.weights.shape) for name, s in trace.attention.items()}
    {'stages.1.1': (1, 2, 64, 64)}
    """
    from visattn.intercept import not_captured, watching
    from visattn.tokens import token_layout

    hw = (int(images.shape[-2]), int(images.shape[-1]))
    rec = Recorder({id(m): n for n, m in model.named_modules()}, budget_bytes,
                   layout=layout or token_layout(model, hw), image_hw=hw)
    token = _RECORDER.set(rec)
    try:
        with torch.set_grad_enabled(grad), watching():
            out = model(images)
    finally:
        _RECORDER.reset(token)
    skipped = not_captured(model, set(rec.sites), rec.skipped)
    for name, reason in skipped.items():
        warnings.warn(f"not captured: {name} ({reason})", CaptureWarning, stacklevel=2)
    return Trace(logits=getattr(out, "logits", out), sites=rec.sites, skipped=skipped)


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
    otherwise), explicit when captured; the head outputs pass through the thread's edit, if any
    (:func:`editing`).

    q, k: (B, h, N, d_k); v: (B, h, N, d_v); bias: (h, N, N). Returns (B, h, N, d_v).
    """
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
    edit = _EDIT.get()
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
