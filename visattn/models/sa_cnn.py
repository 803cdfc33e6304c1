"""sa_cnn: airbench-shaped conv stages with 2D multi-head self-attention blocks."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from visattn.models.attention import SpatialSelfAttention2d
from visattn.models.blocks import Classifier, ConvGroup, WhiteningStem
from visattn.models.registry import register_model


@dataclass
class SACNNConfig:
    num_classes: int = 10
    image_size: int = 32  # input side; fixes the grids of learned/relative encodings
    widths: tuple[int, ...] = (32, 128, 256)  # channels of each conv stage (each halves H, W)
    # stages followed by attention blocks, one entry per block: (0, 1, 1) puts one block on the
    # 16×16 grid and two on the 8×8 grid of a 32×32 input
    attn_stages: tuple[int, ...] = (1,)
    depth: int = 1  # attention blocks per entry of attn_stages
    heads: int = 4
    similarity: str = "dot"  # "dot" (÷√d_k) or "cosine" (learned temperature)
    pos_encoding: str = "sinusoidal"  # "none", "sinusoidal", "learned", "relative"
    gate_init: float = 0.1  # initial residual gate of each attention block
    temperature_init: float = 10.0  # initial temperature of cosine similarity
    stem_stride: int = 1  # 2: the whitening stem tiles the image, so the stages start at half the side


class SACNN(nn.Module):
    def __init__(self, cfg: SACNNConfig) -> None:
        super().__init__()
        self.stem = WhiteningStem(stride=cfg.stem_stride)
        side = cfg.image_size + 1 if cfg.stem_stride == 1 else cfg.image_size // cfg.stem_stride
        stages, c_in = [], self.stem.out_channels
        for i, width in enumerate(cfg.widths):
            side //= 2
            layers = [ConvGroup(c_in, width)]
            if i in cfg.attn_stages:
                layers += [
                    SpatialSelfAttention2d(
                        width, cfg.heads, (side, side), cfg.similarity, cfg.pos_encoding, cfg.gate_init,
                        cfg.temperature_init,
                    )
                    for _ in range(cfg.depth * cfg.attn_stages.count(i))
                ]
            stages.append(nn.Sequential(*layers))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.head = Classifier(c_in, cfg.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


@register_model("sa_cnn", SACNNConfig)
def sa_cnn(cfg: SACNNConfig) -> nn.Module:
    return SACNN(cfg)
