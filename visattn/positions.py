"""A model's position encodings, and switching them off for one thread.

Attention by itself cannot tell where a token is; position enters in one of four ways:

- a learned absolute table added to the tokens (timm ``pos_embed``, Hugging Face
  ``position_embeddings``, torchvision ``pos_embedding``, visattn's hybrid_vit and sa_cnn
  ``pos_embed``);
- a learned relative-position bias table added to the logits (timm and Hugging Face
  ``relative_position_bias_table``, visattn's ``rel_bias.table``);
- a fixed sinusoidal code computed in the forward pass (visattn's sa_cnn);
- rotary embeddings (RoPE) that turn Q and K: found and named, but not switched off.

Inside :func:`positions_off`, the calling thread runs the model with every table read as
zeros and the sinusoidal code left out, exactly as a copy of the model with those tables
zeroed would run: a ``TorchFunctionMode`` (PyTorch keeps the mode stack per thread, as for
:mod:`visattn.intercept`) hands a zero tensor to every call that would read a table, and a
``ContextVar`` tells visattn's own layers to leave out their sinusoidal code. Nothing on the
model changes, so other threads sharing it are not affected.
"""
from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from visattn.errors import VisattnError

_ABSOLUTE = re.compile(r"(^|\.)(pos_embed|pos_embedding|position_embeddings?|absolute_pos_embed)(\.weight)?$")
_RELATIVE = re.compile(r"(^|\.)(relative_position_bias_table|rel_bias\.table)$")
_ROTARY = re.compile(r"Rope|Rotary", re.IGNORECASE)
_SINUSOIDAL_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("visattn_sinusoidal_off", default=False)


class PositionsError(VisattnError, ValueError):
    """Position encodings asked to be switched off where the model has none that can be."""


@dataclass(frozen=True)
class PositionEncoding:
    """One position encoding of a model: where it lives, what kind it is, whether
    :func:`positions_off` switches it off."""

    name: str  # parameter or module name
    kind: str  # "learned absolute", "relative bias", "sinusoidal" or "rotary"
    shape: tuple[int, ...] = ()

    @property
    def switchable(self) -> bool:
        return self.kind != "rotary"

    def __str__(self) -> str:
        shape = f" ({'×'.join(map(str, self.shape))})" if self.shape else ""
        return f"{self.kind} `{self.name}`{shape}"


def position_encodings(model: nn.Module) -> list[PositionEncoding]:
    """Every position encoding of ``model``, in module order.

    >>> from visattn import create_model
    >>> [str(p) for p in position_encodings(create_model("hybrid_vit", depth=1))]
    ['learned absolute `pos_embed` (1×64×128)']
    >>> position_encodings(create_model("sa_cnn", pos_encoding="none"))
    []
    """
    found: list[PositionEncoding] = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.numel() == 0:
            continue
        if _ABSOLUTE.search(name):
            found.append(PositionEncoding(name, "learned absolute", tuple(t.shape)))
        elif _RELATIVE.search(name):
            found.append(PositionEncoding(name, "relative bias", tuple(t.shape)))
    for name, m in model.named_modules():
        if getattr(m, "pos_encoding", None) == "sinusoidal":
            found.append(PositionEncoding(name, "sinusoidal"))
        elif _ROTARY.search(type(m).__name__):
            found.append(PositionEncoding(name, "rotary"))
    return found


def sinusoidal_on() -> bool:
    """Whether visattn's layers add their sinusoidal code in this thread (not inside
    :func:`positions_off`)."""
    return not _SINUSOIDAL_OFF.get()


class _Zeroed(TorchFunctionMode):
    """Hands a zero tensor of the same shape, dtype and device to every torch call that
    would read one of ``tables`` (matched by identity: the parameter object itself)."""

    def __init__(self, tables: list[Tensor]) -> None:
        super().__init__()
        self._tables = {id(t): t for t in tables}
        self._zeros: dict[int, Tensor] = {}

    def _swap(self, a):
        if isinstance(a, Tensor):
            if id(a) not in self._tables:
                return a
            if id(a) not in self._zeros:
                self._zeros[id(a)] = a.detach().new_zeros(a.shape)
            return self._zeros[id(a)]
        if isinstance(a, (list, tuple)):
            return type(a)(self._swap(x) for x in a)
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        return func(*[self._swap(a) for a in args], **{k: self._swap(v) for k, v in kwargs.items()})


@contextlib.contextmanager
def positions_off(model: nn.Module) -> Iterator[list[PositionEncoding]]:
    """Run ``model`` without its position encodings inside the ``with`` block, in this
    thread only; yields those switched off. PositionsError when there is none to switch off.

    >>> import torch
    >>> from visattn import create_model
    >>> model, x = create_model("hybrid_vit", depth=1).eval(), torch.rand(1, 3, 32, 32)
    >>> with positions_off(model) as off, torch.no_grad():
    ...     logits = model(x)
    >>> [p.name for p in off], bool(model.pos_embed.abs().sum() > 0)
    (['pos_embed'], True)
    """
    found = position_encodings(model)
    off = [p for p in found if p.switchable]
    if not off:
        rotary = [p.name for p in found if not p.switchable]
        raise PositionsError(f"{type(model).__name__} has no position table or sinusoidal code to switch off"
                             + (f" (its rotary embeddings in {', '.join(rotary)} are not switched off)" if rotary
                                else ": it finds positions only through its convolutions or not at all"))
    named = dict([*model.named_parameters(), *model.named_buffers()])
    token = _SINUSOIDAL_OFF.set(True)
    try:
        with _Zeroed([named[p.name] for p in off if p.name in named]):
            yield off
    finally:
        _SINUSOIDAL_OFF.reset(token)
