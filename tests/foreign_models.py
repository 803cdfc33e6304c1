"""Tiny models of other libraries' families, built as their users build them (no download)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

SIDE = 32  # input side of every tiny model; 8-px patches -> a 4x4 grid
TINY_TIMM: dict[str, tuple[str, dict[str, Any]]] = {  # family -> (timm architecture, overrides)
    "vit": ("vit_tiny_patch16_224", {}),
    "vit_qknorm": ("vit_tiny_patch16_224", {"qk_norm": True}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "vit_registers": ("vit_small_patch14_reg4_dinov2", {}),
}
TIMM_BASE = {"img_size": SIDE, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}
HF_FAMILIES = ("vit", "deit", "dinov2_registers")


def tiny_timm(family: str, **extra: Any) -> nn.Module:
    import timm

    arch, overrides = TINY_TIMM[family]
    return timm.create_model(arch, pretrained=False, **{**TIMM_BASE, **overrides, **extra}).eval()


def tiny_hf(family: str, **extra: Any) -> nn.Module:
    """A Hugging Face image classifier with random weights and labels "class 0".."class 4"."""
    import transformers as T

    common = dict(image_size=SIDE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, id2label={i: f"class {i}" for i in range(5)}, **extra)
    if family == "vit":
        return T.ViTForImageClassification(T.ViTConfig(**common)).eval()
    if family == "deit":
        return T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**common)).eval()
    if family == "dinov2_registers":
        return T.Dinov2WithRegistersForImageClassification(
            T.Dinov2WithRegistersConfig(num_register_tokens=3, **common)).eval()
    if family == "swin":
        return T.SwinForImageClassification(T.SwinConfig(
            image_size=SIDE, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
            id2label={i: f"class {i}" for i in range(5)}, **extra)).eval()
    raise KeyError(family)


def lively(model: nn.Module) -> nn.Module:
    """``model`` with weights drawn at scale 1/√fan-in, biases, norms and tokens perturbed:
    the libraries' initialisations (std 0.02, exact zeros for CLS, distillation and register
    tokens and positions) make near-uniform attention and relevance near zero, too weak to test."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2 and "token" not in name and "pos" not in name:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.5 * noise if "token" in name or "pos" in name else 0.1 * noise)
    return model


def tiny_torchvision() -> nn.Module:
    import torchvision

    model = torchvision.models.VisionTransformer(SIDE, 8, 2, 2, 32, 64, num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: no gradient at all
    return model


class MHANet(nn.Module):
    """A user's own model: patches -> one ``nn.MultiheadAttention`` (called the common
    way, with its default ``need_weights=True``) -> mean pool -> classes."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Conv2d(3, 16, 8, 8)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=batch_first)
        self.head = nn.Linear(16, 5)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        return t if self.batch_first else t.transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        y = self.attn(t, t, t)[0]
        return self.head((y if self.batch_first else y.transpose(0, 1)).mean(1))
