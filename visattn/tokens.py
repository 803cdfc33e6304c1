"""Where each token of a vision transformer comes from, read from the model itself.

A ViT's sequence is ``prefix`` tokens (CLS, DeiT's distillation token, registers) followed
by the patch grid in row-major order. :func:`token_layout` reads both from the model's own
attributes and config (timm, Hugging Face, torchvision), for any input size, so nothing is
guessed from a token count; :func:`guess_layout` is the last resort for a custom model.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class TokenLayout:
    """``prefix`` named tokens, then a ``grid`` (rows, columns) of patches.

    >>> TokenLayout(("CLS", "register 1"), (2, 3)).tokens
    8
    """

    prefix_names: tuple[str, ...]
    grid: tuple[int, int]

    @property
    def prefix(self) -> int:
        return len(self.prefix_names)

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]


def _pair(v: object) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[-1])
    return int(v), int(v)  # type: ignore[call-overload]


def _prefix_names(cls: bool, distillation: bool, registers: int) -> tuple[str, ...]:
    names = ("CLS",) * cls + ("distillation",) * distillation
    return names + tuple(f"register {i + 1}" for i in range(registers))


def _timm_layout(m: nn.Module, hw: tuple[int, int]) -> TokenLayout | None:
    pe = getattr(m, "patch_embed", None)
    if not isinstance(getattr(m, "num_prefix_tokens", None), int) or pe is None or not hasattr(pe, "patch_size"):
        return None
    if hasattr(pe, "dynamic_feat_size"):
        grid = tuple(pe.dynamic_feat_size(hw))
    else:
        p = _pair(pe.patch_size)
        grid = (hw[0] // p[0], hw[1] // p[1])
    registers = int(getattr(m, "num_reg_tokens", 0) or 0)
    distillation = getattr(m, "dist_token", None) is not None
    cls = m.num_prefix_tokens - registers - distillation > 0
    names = _prefix_names(cls, distillation, registers)
    if len(names) != m.num_prefix_tokens:  # a variant whose prefix tokens we cannot name
        names = tuple(f"prefix {i + 1}" for i in range(m.num_prefix_tokens))
    return TokenLayout(names, grid)  # type: ignore[arg-type]


def _hf_layout(m: nn.Module, hw: tuple[int, int]) -> TokenLayout | None:
    config, emb = getattr(m, "config", None), getattr(m, "embeddings", None)
    if config is None or emb is None or getattr(config, "patch_size", None) is None:
        return None
    p = _pair(config.patch_size)
    registers = int(getattr(config, "num_register_tokens", 0) or 0)
    names = _prefix_names(
        getattr(emb, "cls_token", None) is not None, getattr(emb, "distillation_token", None) is not None, registers
    )
    return TokenLayout(names, (hw[0] // p[0], hw[1] // p[1]))


def _torchvision_layout(m: nn.Module, hw: tuple[int, int]) -> TokenLayout | None:
    import torchvision

    if not isinstance(m, torchvision.models.VisionTransformer):
        return None
    return TokenLayout(("CLS",), (hw[0] // m.patch_size, hw[1] // m.patch_size))


def token_layout(model: nn.Module, hw: tuple[int, int]) -> TokenLayout | None:
    """The layout of ``model``'s token sequence for an input of ``hw`` = (height, width)
    pixels, from the first ViT found in it (the model itself or a wrapped one); ``None``
    when it is none of timm's, Hugging Face's or torchvision's.

    >>> import torchvision
    >>> vit = torchvision.models.VisionTransformer(32, 8, 1, 2, 16, 32, num_classes=3)
    >>> token_layout(vit, (32, 32))
    TokenLayout(prefix_names=('CLS',), grid=(4, 4))
    """
    for m in model.modules():
        for read in (_timm_layout, _hf_layout, _torchvision_layout):
            layout = read(m, hw)
            if layout is not None:
                return layout
    return None


def guess_layout(n_tokens: int, hw: tuple[int, int]) -> TokenLayout:
    """For a model :func:`token_layout` does not know: a patch grid with the image's aspect
    ratio after one CLS token or none, else a single row of ``n_tokens``.

    >>> guess_layout(1 + 2 * 4, (32, 64))
    TokenLayout(prefix_names=('CLS',), grid=(2, 4))
    """
    for prefix in (1, 0):
        n = n_tokens - prefix
        for rows in range(1, n + 1):
            if n % rows == 0 and rows * hw[1] == (n // rows) * hw[0]:
                return TokenLayout(("CLS",) * prefix, (rows, n // rows))
    return TokenLayout((), (1, n_tokens))
