"""torchvision's Vision Transformers through ``get_model`` and the weights API.

Their ``nn.MultiheadAttention`` layers are captured like any other
(:mod:`visattn.intercept`); the model is left as torchvision builds it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torchvision
from torch import nn

from visattn.models.registry import register_model

TV_VITS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")


@dataclass
class TorchvisionViTConfig:
    weights: str | None = None  # "DEFAULT", "IMAGENET1K_V1", ...: downloads unless cached
    image_size: int = 224  # only with weights=None; pretrained weights fix it
    num_classes: int = 1000  # only with weights=None


def _factory(arch: str):
    def build(cfg: TorchvisionViTConfig) -> nn.Module:
        if cfg.weights is None:
            model = torchvision.models.get_model(arch, weights=None, image_size=cfg.image_size,
                                                 num_classes=cfg.num_classes)
        else:
            model = torchvision.models.get_model(arch, weights=cfg.weights)
        return model

    return build


for _arch in TV_VITS:
    register_model(_arch, TorchvisionViTConfig)(_factory(_arch))
