"""hybrid_vit: a convolutional tokenizer, then transformer blocks over the tokens
of a 32×32 image (Compact Convolutional Transformer, Hassani et al. 2021)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from visattn.models.attention import TokenSelfAttention
from visattn.models.registry import register_model


@dataclass
class HybridViTConfig:
    num_classes: int = 10
    image_size: int = 32
    embed_dim: int = 128  # token width
    depth: int = 4  # transformer blocks
    heads: int = 4
    mlp_ratio: float = 2.0
    cls_token: bool = False  # a CLS token, else attention-weighted sequence pooling


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, grid: tuple[int, int], prefix: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = TokenSelfAttention(dim, heads, grid, prefix)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HybridViT(nn.Module):
    def __init__(self, cfg: HybridViTConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.tokenizer = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
            nn.Conv2d(64, d, 3, padding=1, bias=False), nn.BatchNorm2d(d), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        side = cfg.image_size // 4
        prefix = int(cfg.cls_token)
        self.cls = nn.Parameter(torch.zeros(1, prefix, d))
        self.pos_embed = nn.Parameter(torch.randn(1, prefix + side * side, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, cfg.heads, cfg.mlp_ratio, (side, side), prefix) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d)
        self.pool = nn.Identity() if cfg.cls_token else nn.Linear(d, 1)
        self.fc = nn.Linear(d, cfg.num_classes)
        self.use_cls = cfg.cls_token

    def forward(self, x: Tensor) -> Tensor:
        t = self.tokenizer(x).flatten(2).transpose(1, 2)  # (B, N, C)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1) + self.pos_embed
        t = self.norm(self.blocks(t))
        if self.use_cls:
            return self.fc(t[:, 0])
        w = self.pool(t).softmax(dim=1)  # (B, N, 1): sequence pooling
        return self.fc((w * t).sum(dim=1))


@register_model("hybrid_vit", HybridViTConfig)
def hybrid_vit(cfg: HybridViTConfig) -> nn.Module:
    return HybridViT(cfg)
