"""Exact attention capture, safe to run from many threads on one shared model.

Every attention layer goes through :func:`visattn.sites.attend`, which takes the fused SDPA
path when nobody watches (training, plain inference). Inside :func:`capture` a fresh
:class:`~visattn.sites.Recorder` is this thread's (a ``contextvars.ContextVar``): each
thread (each Streamlit session) sees only its own, so two users capturing on one cached
model never mix their maps, and no hook or recorder is left on the model.

The same dispatch carries interventions: inside :func:`editing` an edit function sees every
head output (``weights @ V``, before the output projection) and may replace it, again for
the calling thread only (``visattn.ablation`` builds head ablation and patching on it).

Attention computed by other libraries (any ``nn.MultiheadAttention``, timm's and Hugging
Face's attention modules) is routed through :func:`~visattn.sites.attend` by :mod:`visattn.intercept`, for
the capturing (or editing) thread only: nothing on the model changes, not even a class.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from visattn.intercept import not_captured, watching
from visattn.sites import (
    DEFAULT_BUDGET_BYTES, AttentionSite, ChannelSite, HeadEdit, Recorder, Site, SpatialSite, edited, recording,
)
from visattn.tokens import TokenLayout, token_layout


class CaptureWarning(UserWarning):
    """The attention layers whose weights a capture could not see (named, with the reason)."""


def not_captured_line(skipped: dict[str, str], shown: int = 4) -> str:
    """One line naming the layers a capture could not see, grouped by reason (the first
    ``shown`` names of each group, then how many more); ``""`` when there are none.

    >>> not_captured_line({"blocks.3.attn": "custom fused kernel"})
    'not captured: blocks.3.attn (custom fused kernel)'
    >>> not_captured_line({f"layers.{i}.attn": "windowed attention" for i in range(6)} | {"head.attn": "cross"}, 2)
    'not captured: layers.0.attn, layers.1.attn and 4 more (windowed attention); head.attn (cross)'
    """
    groups: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        groups.setdefault(reason, []).append(name)
    parts = [", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "") + f" ({reason})"
             for reason, names in groups.items()]
    return f"not captured: {'; '.join(parts)}" if parts else ""


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
    with edited(edit), watching():
        yield


def capture(
    model: nn.Module, images: Tensor, *, budget_bytes: int = DEFAULT_BUDGET_BYTES, grad: bool = False,
    layout: TokenLayout | None = None,
) -> Trace:
    """Run ``model`` on ``images`` and return its logits with every attention map.

    Sees visattn's own layers, every ``nn.MultiheadAttention`` and timm's and Hugging
    Face's attention (:mod:`visattn.intercept`); each attention layer it cannot see is
    named in ``Trace.skipped`` and, all together, in one :class:`CaptureWarning` line
    (:func:`not_captured_line`). Token layouts come from
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
    hw = (int(images.shape[-2]), int(images.shape[-1]))
    rec = Recorder({id(m): n for n, m in model.named_modules()}, budget_bytes,
                   layout=layout or token_layout(model, hw), image_hw=hw)
    with recording(rec), torch.set_grad_enabled(grad), watching():
        out = model(images)
    skipped = not_captured(model, set(rec.sites), rec.skipped)
    if skipped:
        warnings.warn(not_captured_line(skipped), CaptureWarning, stacklevel=2)
    return Trace(logits=getattr(out, "logits", out), sites=rec.sites, skipped=skipped)
