"""Exact capture of attention that other libraries compute: any ``nn.MultiheadAttention``,
timm's and Hugging Face's attention modules.

During :func:`visattn.capture` and :func:`visattn.tracing.editing`, :func:`watching` keeps
:class:`ForeignAttention` (a ``TorchFunctionMode``) active in the calling thread only:
PyTorch keeps the mode stack per thread, so other threads, and every call outside a capture
or an edit, run the model untouched, fused kernels included. Nothing is attached to the
model. The mode sees three calls:

- ``F.scaled_dot_product_attention`` (timm's fused path, transformers' ``"sdpa"``): routed
  through :func:`visattn.sites.attend`, which keeps the weights;
- ``F.multi_head_attention_forward`` (every ``nn.MultiheadAttention``): the same, after the
  module's own input projection;
- a softmax in transformers' ``eager_attention_forward`` or timm's unfused path: the weights
  are the model's own, Q and K are read from the calling frame (under a logit rescale,
  :func:`visattn.sites.rescaled`, the weights are recomputed with the new scale; under a head
  edit, the model's next ``weights @ V`` goes through the edit).

The module that made a call is the nearest ``self`` / ``module`` on the Python stack.
Windowed (Swin) and cross-attention calls are run as they are and reported as not captured;
so is every attention-like module no call came from (:func:`not_captured`).
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import re
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from visattn.sites import AttentionSite, attend, current_edit, current_recorder, current_rescale, record_extras
from visattn.tokens import guess_layout


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The parameters of ``F.scaled_dot_product_attention`` (a builtin without a signature)."""


_SDPA_SIGNATURE = inspect.signature(_sdpa_signature)
_SOFTMAX = (F.softmax, torch.softmax, Tensor.softmax)
_MATMUL = (torch.matmul, Tensor.matmul, Tensor.__matmul__)
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_ATTENTION_CLASS = re.compile(r"Attention(2d)?$")
_WINDOWED_CLASS = re.compile(r"Window|Swin")
_PLUMBING = (  # frames between a model's code and this mode
    str(sys.modules["torch.overrides"].__file__), str(F.__file__), __file__,
)
WINDOWED = "windowed attention: Swin windows are not placed on the image"
CUSTOM = "custom fused kernel"
CROSS = "cross-attention: queries and keys are different tokens"
DROPOUT = "attention dropout is on (the model is in training mode)"
PER_IMAGE_MASK = "the attention mask differs between the images of the batch"


def is_attention_module(m: nn.Module) -> bool:
    """Whether ``m`` looks like a self-attention layer whose weights a capture should show."""
    return isinstance(m, nn.MultiheadAttention) or bool(_ATTENTION_CLASS.search(type(m).__name__))


def _windowed(m: nn.Module) -> bool:
    return bool(_WINDOWED_CLASS.search(type(m).__name__))


def _site_bias(mask: Tensor | None, heads: int, n: int, dtype: torch.dtype, masked: bool) -> tuple[Tensor | None, bool]:
    """An additive (heads, N, N) logit bias from an attention mask that broadcasts to
    (B, heads, N, N); False when it differs between the images of the batch. ``masked``: a
    True entry means "do not attend" (``nn.MultiheadAttention``) rather than "attend" (SDPA)."""
    if mask is None:
        return None, True
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask if masked else ~mask, float("-inf"))
    if mask.dim() == 4:
        if mask.shape[0] != 1:
            return None, False
        mask = mask[0]
    try:
        return mask.to(dtype).expand(heads, n, n), True
    except RuntimeError:  # not a (heads, N, N) pattern shared by the batch
        return None, False


_WATCHING: contextvars.ContextVar[bool] = contextvars.ContextVar("visattn_watching", default=False)


@contextlib.contextmanager
def watching() -> Iterator[None]:
    """Route foreign attention through :func:`visattn.sites.attend` in this thread while
    the block runs (once, however deeply nested)."""
    if _WATCHING.get():
        yield
        return
    token = _WATCHING.set(True)
    try:
        with ForeignAttention():
            yield
    finally:
        _WATCHING.reset(token)


class ForeignAttention(TorchFunctionMode):
    """Sends foreign attention calls to :func:`~visattn.sites.attend` (records them when
    a capture runs in this thread, with its layout; its ``skipped`` gets the refusals)."""

    def __init__(self) -> None:
        super().__init__()
        self._handlers: dict[Any, Callable] = {F.scaled_dot_product_attention: self._sdpa,
                                                F.multi_head_attention_forward: self._mha}
        self._handlers.update({f: self._softmax for f in _SOFTMAX})
        self._pending: tuple[nn.Module, int, torch.Size] | None = None  # softmax weights whose @ V is edited

    def __torch_function__(self, func, types, args=(), kwargs=None):
        handler = self._handlers.get(func)
        if handler is None:
            if self._pending is not None and func in _MATMUL:
                return self._weighted_sum(func, args, kwargs or {})
            if self._pending is not None and func is Tensor.to:
                return self._cast(func, args, kwargs or {})
            return func(*args, **(kwargs or {}))
        return handler(func, args, kwargs or {})

    def _weighted_sum(self, func, args, kwargs):
        """``weights @ V`` after a softmax path's weights (dropout in eval mode between them
        keeps their storage): its head outputs go through this thread's edit."""
        out = func(*args, **kwargs)
        owner, ptr, shape = self._pending
        w = args[0] if args else None
        if isinstance(w, Tensor) and w.data_ptr() == ptr and w.shape == shape and out.dim() == 4:
            self._pending = None
            edit = current_edit()
            return edit(owner, out) if edit is not None else out
        return out

    def _cast(self, func, args, kwargs):
        """The pending weights cast (transformers' eager path in half precision softmaxes in
        float32, then ``.to(query.dtype)``): the cast copy is the one whose ``@ V`` is edited."""
        out = func(*args, **kwargs)
        owner, ptr, shape = self._pending
        if isinstance(args[0], Tensor) and args[0].data_ptr() == ptr and isinstance(out, Tensor):
            self._pending = (owner, out.data_ptr(), out.shape)
        return out

    # -- where a call comes from ---------------------------------------------------------
    def _caller(self) -> FrameType | None:
        """The first frame of model code above this mode."""
        f = sys._getframe(1)
        while f is not None and f.f_code.co_filename in _PLUMBING:
            f = f.f_back
        return f

    def _owner(self, frame: FrameType | None) -> nn.Module | None:
        """The module on whose behalf ``frame`` runs: the nearest ``self`` or ``module`` (one
        of the captured model's, when a capture runs)."""
        rec = current_recorder()
        for _ in range(6):
            if frame is None:
                return None
            local = frame.f_locals
            for key in ("self", "module"):
                m = local.get(key)
                if isinstance(m, nn.Module) and (rec is None or id(m) in rec.names):
                    return m
            frame = frame.f_back
        return None

    def _grid(self, n: int) -> tuple[tuple[int, int], int]:
        rec = current_recorder()
        if rec is None:
            return (1, n), 0
        layout = rec.layout if rec.layout is not None and rec.layout.tokens == n else guess_layout(n, rec.image_hw)
        return layout.grid, layout.prefix

    def _refuse(self, owner: nn.Module, reason: str) -> None:
        rec = current_recorder()
        if rec is not None:
            rec.skipped.setdefault(rec.name_of(owner), reason)

    def _refusal(self, owner: nn.Module | None, q: Tensor, k: Tensor) -> str | None:
        """Why a call of ``owner`` on queries ``q`` and keys ``k`` (B, heads, N, d) cannot be
        recorded; ``""`` for a call to run as it is without a word, ``None`` when it can be."""
        if owner is None or type(owner).__module__.startswith("visattn."):
            return ""  # not a module of the model, or one that records itself
        if _windowed(owner):
            return WINDOWED
        if q.dim() != 4 or k.dim() != 4 or q.shape[-2] != k.shape[-2]:
            return CROSS
        return None

    def _run_as_is(self, owner: nn.Module | None, refusal: str, func, args, kwargs):
        if refusal:
            self._refuse(owner, refusal)
        return func(*args, **kwargs)

    # -- the three calls ---------------------------------------------------------------
    def _sdpa(self, func, args, kwargs):
        p = _SDPA_SIGNATURE.bind(*args, **kwargs).arguments
        q, k, v = p["query"], p["key"], p["value"]
        owner = self._owner(self._caller())
        refusal = self._refusal(owner, q, k)
        if refusal is None and p.get("dropout_p", 0.0):
            refusal = DROPOUT
        if refusal is not None:
            return self._run_as_is(owner, refusal, func, args, kwargs)
        h, n = q.shape[1], q.shape[2]
        bias, shared = _site_bias(p.get("attn_mask"), h, n, q.dtype, masked=False)
        if not shared:
            return self._run_as_is(owner, PER_IMAGE_MASK, func, args, kwargs)
        if p.get("is_causal"):
            causal = torch.full((n, n), float("-inf"), dtype=q.dtype, device=q.device).triu(1).expand(h, n, n)
            bias = causal if bias is None else bias + causal
        if p.get("enable_gqa") and k.shape[1] != h:
            k, v = k.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // v.shape[1], 1)
        scale = p.get("scale") or q.shape[-1] ** -0.5
        grid, prefix = self._grid(n)
        return attend(owner, q, k, v, similarity="dot", scale=float(scale), bias=bias, grid=grid, prefix=prefix)

    def _mha(self, func, args, kwargs):
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        p = bound.arguments
        query = p["query"]
        owner = self._owner(self._caller())
        x = query.transpose(0, 1) if query.dim() == 3 else query[None]  # (B, L, E)
        b, n, e = x.shape
        h = p["num_heads"]
        if owner is None or type(owner).__module__.startswith("visattn."):
            refusal: str | None = ""
        elif not (p["key"] is query and p["value"] is query):
            refusal = CROSS
        elif p["bias_k"] is not None or p["add_zero_attn"] or p["static_k"] is not None:
            refusal = "nn.MultiheadAttention with bias_k, add_zero_attn or static keys"
        elif p["training"] and p["dropout_p"]:
            refusal = DROPOUT
        else:
            refusal = None
        if refusal is not None:
            return self._run_as_is(owner, refusal, func, args, kwargs)
        attn_mask, padding = p["attn_mask"], p["key_padding_mask"]  # (L, S) or (B*h, L, S); (B, S)
        masks = [_site_bias(attn_mask.view(b, h, n, n) if attn_mask.dim() == 3 else attn_mask, h, n, x.dtype, True)
                 if attn_mask is not None else (None, True),
                 _site_bias(padding.view(b, 1, 1, n), h, n, x.dtype, True) if padding is not None else (None, True)]
        if not all(shared for _, shared in masks):
            return self._run_as_is(owner, PER_IMAGE_MASK, func, args, kwargs)
        if p["use_separate_proj_weight"]:
            weight = torch.cat([p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]])
        else:
            weight = p["in_proj_weight"]
        qkv = F.linear(x, weight, p["in_proj_bias"])
        q, k, v = qkv.reshape(b, n, 3, h, e // h).permute(2, 0, 3, 1, 4)
        biases = [m for m, _ in masks if m is not None]
        bias = sum(biases[1:], biases[0]) if biases else None
        grid, prefix = self._grid(n)
        out = attend(owner, q, k, v, similarity="dot", scale=(e // h) ** -0.5, bias=bias, grid=grid, prefix=prefix)
        out = out.transpose(1, 2).reshape(b, n, e)
        proj = getattr(owner, "out_proj", None)
        if isinstance(proj, nn.Linear) and proj.weight is p["out_proj_weight"]:
            out = proj(out)  # the module itself, so hooks on it see the head outputs
        else:
            out = F.linear(out, p["out_proj_weight"], p["out_proj_bias"])
        record_extras(owner, inputs=x, context=out)
        weights = None
        if p["need_weights"]:  # the caller wants them too: per head, or averaged over heads
            rec = current_recorder()
            site = rec.sites.get(rec.name_of(owner)) if rec is not None else None
            weights = site.weights if isinstance(site, AttentionSite) else None
            if weights is None:
                logits = (q @ k.transpose(-2, -1)) * (e // h) ** -0.5
                weights = (logits if bias is None else logits + bias).softmax(-1)
            weights = weights.mean(1) if p["average_attn_weights"] else weights
            weights = weights if query.dim() == 3 else weights[0]
        return (out.transpose(0, 1) if query.dim() == 3 else out[0]), weights

    def _softmax(self, func, args, kwargs):
        weights = func(*args, **kwargs)
        frame = self._caller()
        local = frame.f_locals if frame is not None else {}
        if frame is not None and frame.f_code.co_name == "eager_attention_forward":  # transformers
            owner, q, k, v = local.get("module"), local.get("query"), local.get("key"), local.get("value")
            scale, mask = local.get("scaling"), local.get("attention_mask")
        elif isinstance(local.get("self"), nn.Module) and getattr(local["self"], "fused_attn", True) is False:
            owner, q, k, v = local["self"], local.get("q"), local.get("k"), local.get("v")  # timm, unfused
            scale, mask = getattr(owner, "scale", None), local.get("attn_bias")
            q = q / scale if isinstance(q, Tensor) and scale else q  # timm scaled q in place of the logits
        else:
            return weights
        if not all(isinstance(t, Tensor) for t in (q, k, v)) or not isinstance(owner, nn.Module) or not scale:
            return weights
        rec = current_recorder()
        if rec is not None and id(owner) not in rec.names:
            return weights
        rescale = current_rescale()
        if rescale is not None and q.dim() == k.dim() == 4:
            new = float(rescale(owner, float(scale), q.shape[-1], "dot"))
            if new != scale:  # the model's logits plus (new - old) Q Kᵀ: its mask stays as it was
                weights = func(args[0] + (q @ k.transpose(-2, -1)) * (new - scale), *args[1:], **kwargs)
                scale = new
        refusal = self._refusal(owner, q, k)
        if refusal is None and current_edit() is not None:  # the model computes weights @ V: edited there
            self._pending = (owner, weights.data_ptr(), weights.shape)
        if rec is None:
            return weights
        if refusal is None and weights.shape != (*q.shape[:-1], k.shape[-2]):
            refusal = CUSTOM
        bias, shared = (None, True) if refusal is not None else _site_bias(mask, q.shape[1], q.shape[2], q.dtype, False)
        refusal = PER_IMAGE_MASK if refusal is None and not shared else refusal
        if refusal is not None:
            if refusal:
                self._refuse(owner, refusal)
            return weights
        n = q.shape[2]
        grid, prefix = self._grid(n)
        rec.add(AttentionSite(name=rec.name_of(owner), q=q, k=k, v=v, weights=weights, similarity="dot",
                                   scale=float(scale), bias=bias, grid=grid, prefix=prefix))
        return weights


def not_captured(model: nn.Module, recorded: set[str], skipped: dict[str, str]) -> dict[str, str]:
    """``{layer: reason}`` for every attention-like layer of ``model`` with no recorded site
    in it, around it or below it: the refusals in ``skipped`` plus layers no call came from
    (the innermost such layer is named)."""
    out = dict(skipped)
    seen = recorded | set(skipped)
    candidates = {name: m for name, m in model.named_modules() if name and is_attention_module(m)}
    for name, m in candidates.items():
        if any(s == name or s.startswith(name + ".") or name.startswith(s + ".") for s in seen):
            continue
        if any(c.startswith(name + ".") for c in candidates):
            continue
        out[name] = WINDOWED if _windowed(m) else CUSTOM
    return out
