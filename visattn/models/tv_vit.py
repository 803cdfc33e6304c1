"""torchvision's Vision Transformers through ``get_model`` and the weights API.

torchvision calls ``nn.MultiheadAttention`` with ``need_weights=False``. To see its
weights, ``visattn.tracing.make_capturable`` swaps each instance's class for
``CapturableMHA``: same parameters and state-dict keys, same output, and it
computes per-head weights only while a capture (or a head edit) runs in the calling thread.
"""
from __future__ import annotations

from dataclasses import dataclass

import torchvision
from torch import nn

from visattn.models.registry import register_model
from visattn.tracing import make_capturable

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
        return make_capturable(model)

    return build


for _arch in TV_VITS:
    register_model(_arch, TorchvisionViTConfig)(_factory(_arch))
