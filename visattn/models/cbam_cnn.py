"""cbam_cnn: conv stages each followed by SE channel attention and CBAM spatial attention."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from visattn.models.attention import SpatialGate, SqueezeExcite
from visattn.models.blocks import Classifier, ConvGroup, conv_bn
from visattn.models.registry import register_model


@dataclass
class CBAMCNNConfig:
    num_classes: int = 10
    stem_width: int = 32  # channels of the 3×3 stem at full resolution
    widths: tuple[int, ...] = (64, 128, 256)  # channels of each conv stage (each halves H, W)
    reduction: int = 8  # SE bottleneck ratio
    spatial_kernel: int = 7  # CBAM spatial conv size
    use_se: bool = True
    use_spatial: bool = True


class CBAMCNN(nn.Module):
    def __init__(self, cfg: CBAMCNNConfig) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, cfg.stem_width))
        stages, c_in = [], cfg.stem_width
        for width in cfg.widths:
            stages.append(
                nn.Sequential(
                    ConvGroup(c_in, width),
                    SqueezeExcite(width, cfg.reduction) if cfg.use_se else nn.Identity(),
                    SpatialGate(cfg.spatial_kernel) if cfg.use_spatial else nn.Identity(),
                )
            )
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.head = Classifier(c_in, cfg.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


@register_model("cbam_cnn", CBAMCNNConfig)
def cbam_cnn(cfg: CBAMCNNConfig) -> nn.Module:
    return CBAMCNN(cfg)
