"""torchvision's Vision Transformers through ``get_model`` and the weights API.

torchvision calls ``nn.MultiheadAttention`` with ``need_weights=False``. To see its
weights, :func:`make_capturable` swaps each instance's class for
:class:`CapturableMHA`: same parameters and state-dict keys, same output, and it
computes per-head weights only while a capture (or a head edit) runs in the calling thread.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torchvision
from torch import Tensor, nn

from visattn.capture import attend, default_scale, observed, record_extras
from visattn.models.registry import register_model

TV_VITS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")


@dataclass
class TorchvisionViTConfig:
    weights: str | None = None  # "DEFAULT", "IMAGENET1K_V1", ...: downloads unless cached
    image_size: int = 224  # only with weights=None; pretrained weights fix it
    num_classes: int = 1000  # only with weights=None


def _grid_of(n_tokens: int) -> tuple[tuple[int, int], int]:
    """Guess (grid, prefix) from a token count: a square grid, after one CLS token or none."""
    for prefix in (1, 0):
        side = math.isqrt(n_tokens - prefix)
        if side * side == n_tokens - prefix:
            return (side, side), prefix
    return (1, n_tokens), 0


class CapturableMHA(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose self-attention weights a capture can see."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args, **kwargs):  # type: ignore[override]
        plain = (
            not observed()
            or not (query is key is value)
            or not self._qkv_same_embed_dim
            or any(kwargs.get(m) is not None for m in ("key_padding_mask", "attn_mask"))
            or len(args) > 0
        )
        if plain:
            return super().forward(query, key, value, *args, **kwargs)
        x = query if self.batch_first else query.transpose(0, 1)  # (B, L, E)
        b, n, e = x.shape
        qkv = nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, e // self.num_heads).permute(2, 0, 3, 1, 4)
        grid, prefix = _grid_of(n)
        out = attend(self, q, k, v, similarity="dot", scale=default_scale(e // self.num_heads),
                     bias=None, grid=grid, prefix=prefix)  # (B, h, L, d)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, e))
        record_extras(self, inputs=x, context=out)
        return (out if self.batch_first else out.transpose(0, 1)), None


def make_capturable(model: nn.Module) -> nn.Module:
    """Let a capture see every ``nn.MultiheadAttention`` of ``model`` (idempotent)."""
    for m in model.modules():
        if type(m) is nn.MultiheadAttention:
            m.__class__ = CapturableMHA
    return model


def _factory(arch: str):
    def build(cfg: TorchvisionViTConfig) -> nn.Module:
        if cfg.weights is None:
            model = torchvision.models.get_model(arch, weights=None, image_size=cfg.image_size,
                                                 num_classes=cfg.num_classes)
        else:
            model = torchvision.models.get_model(arch, weights=cfg.weights)
        return make_capturable(model)

    return build


for _arch in TV_VITS:
    register_model(_arch, TorchvisionViTConfig)(_factory(_arch))
