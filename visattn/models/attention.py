"""Attention layers: 2D multi-head self-attention over feature-map positions,
transformer token attention, squeeze-and-excitation and CBAM spatial attention."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from visattn.positions import sinusoidal_on
from visattn.sites import (
    ChannelSite, SpatialSite, attend, current_recorder, default_scale, record_extras, record_site,
)

POS_ENCODINGS = ("none", "sinusoidal", "learned", "relative")
SIMILARITIES = ("dot", "cosine")


def sinusoidal_2d(channels: int, h: int, w: int) -> Tensor:
    """Fixed 2D sin/cos encoding (C, H, W): half the channels code y, half code x."""
    quarter = channels // 4
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter) / max(quarter, 1))
    ys = torch.arange(h, dtype=torch.float32)[:, None] * freq  # (H, C/4)
    xs = torch.arange(w, dtype=torch.float32)[:, None] * freq  # (W, C/4)
    pe = torch.zeros(channels, h, w)
    pe[:quarter] = ys.sin().T[:, :, None]
    pe[quarter : 2 * quarter] = ys.cos().T[:, :, None]
    pe[2 * quarter : 3 * quarter] = xs.sin().T[:, None, :]
    pe[3 * quarter : 4 * quarter] = xs.cos().T[:, None, :]
    return pe


class RelativeBias(nn.Module):
    """Learned bias per head for each 2D offset between query and key (Swin-style)."""

    def __init__(self, heads: int, grid: tuple[int, int]) -> None:
        super().__init__()
        h, w = grid
        self.table = nn.Parameter(torch.zeros(heads, (2 * h - 1) * (2 * w - 1)))
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
        rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
        index = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)
        self.register_buffer("index", index, persistent=False)

    def forward(self) -> Tensor:
        return self.table[:, self.index]  # (heads, N, N)


class SpatialSelfAttention2d(nn.Module):
    """Multi-head self-attention over the H×W positions of a feature map.

    Q, K, V are 1×1 convolutions of the (normalised) input; the result is added back
    through a learned residual gate: ``y = x + gate * proj(softmax(sim(Q, K)) V)``.

    Args:
        channels: input and output channels C.
        heads: number of heads; each has C // heads channels.
        grid: (H, W) of the feature map, for learned and relative encodings.
        similarity: "dot" (scaled by 1/sqrt(d_k)) or "cosine" (learned temperature).
        pos_encoding: "none", "sinusoidal", "learned" or "relative".
        gate_init: initial value of the residual gate.
        temperature_init: initial temperature of cosine similarity (at 10, random queries and keys
            already give peaked rows; near 1 the rows start almost uniform and sharpen as it learns).
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        grid: tuple[int, int],
        similarity: str = "dot",
        pos_encoding: str = "sinusoidal",
        gate_init: float = 0.1,
        temperature_init: float = 10.0,
    ) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels {channels} not divisible by heads {heads}")
        if similarity not in SIMILARITIES or pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"bad similarity {similarity!r} or pos_encoding {pos_encoding!r}")
        self.heads, self.grid, self.similarity, self.pos_encoding = heads, grid, similarity, pos_encoding
        self.norm = nn.BatchNorm2d(channels)
        self.q = nn.Conv2d(channels, channels, 1, bias=False)
        self.k = nn.Conv2d(channels, channels, 1, bias=False)
        self.v = nn.Conv2d(channels, channels, 1, bias=False)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature_init)),
                                            requires_grad=similarity == "cosine")
        self.pos_embed = nn.Parameter(
            torch.zeros(1, channels, *grid) if pos_encoding == "learned" else torch.zeros(0),
            requires_grad=pos_encoding == "learned",
        )
        if pos_encoding == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.rel_bias = RelativeBias(heads, grid) if pos_encoding == "relative" else nn.Identity()

    def scale(self) -> float | Tensor:
        if self.similarity == "cosine":
            return self.log_temperature.clamp(max=math.log(100.0)).exp()
        return default_scale(self.q.out_channels // self.heads)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)  # (B, C, H, W)
        if self.pos_encoding == "sinusoidal" and sinusoidal_on():  # off only inside positions_off
            qk_in = n + sinusoidal_2d(c, h, w).to(n)
        elif self.pos_encoding == "learned":
            qk_in = n + self.pos_embed
        else:
            qk_in = n

        def heads_of(t: Tensor) -> Tensor:  # (B, C, H, W) -> (B, heads, N, C/heads)
            return t.reshape(b, self.heads, c // self.heads, h * w).transpose(-2, -1)

        q, k, v = heads_of(self.q(qk_in)), heads_of(self.k(qk_in)), heads_of(self.v(n))
        bias = self.rel_bias() if self.pos_encoding == "relative" else None
        out = attend(self, q, k, v, similarity=self.similarity, scale=self.scale(), bias=bias, grid=(h, w))
        context = self.proj(out.transpose(-2, -1).reshape(b, c, h, w))  # (B, C, H, W)
        y = x + self.gate * context
        if current_recorder() is not None:  # block-level tensors, for the teaching view
            record_extras(
                self,
                inputs=x.flatten(2).transpose(1, 2), context=context.flatten(2).transpose(1, 2),
                outputs=y.flatten(2).transpose(1, 2), gate=float(self.gate.detach()),
            )
        return y


class TokenSelfAttention(nn.Module):
    """Multi-head self-attention over tokens (B, N, C), as in a transformer block."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int], prefix: int = 0) -> None:
        super().__init__()
        self.heads, self.grid, self.prefix = heads, grid, prefix
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, C/heads)
        out = attend(
            self, q, k, v, similarity="dot", scale=default_scale(c // self.heads),
            bias=None, grid=self.grid, prefix=self.prefix,
        )
        context = self.proj(out.transpose(1, 2).reshape(b, n, c))
        if current_recorder() is not None:
            record_extras(self, inputs=x, context=context)
        return context


class SqueezeExcite(nn.Module):
    """Channel attention: global average pool, bottleneck MLP, sigmoid weight per channel."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        w = self.fc(x.mean(dim=(2, 3)))  # (B, C)
        record_site(ChannelSite, self, w)
        return x * w[:, :, None, None]


class SpatialGate(nn.Module):
    """CBAM spatial attention: conv over [mean, max] across channels, sigmoid map."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)  # (B, 2, H, W)
        m = torch.sigmoid(self.bn(self.conv(pooled)))  # (B, 1, H, W)
        record_site(SpatialSite, self, m)
        return x * m
