"""Explanations on other libraries' ViTs: Grad-CAM reads the grid tokens entering the last
block with the model's own token layout (registers, distillation token) and equals a
by-hand Grad-CAM; the attention-based maps come out at input size."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.foreign_models import SIDE, tiny_hf, tiny_timm, tiny_torchvision
from visattn.explain import METHODS, default_cam_layer, grad_cam
from visattn.sources import HFClassifier
from visattn.tokens import token_layout

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {
    "timm registers": (lambda: tiny_timm("vit_registers"), "blocks.1"),
    "timm distilled": (lambda: tiny_timm("deit_distilled"), "blocks.1"),
    "hf dinov2 registers": (lambda: HFClassifier(tiny_hf("dinov2_registers")).eval(),
                            "model.dinov2_with_registers.encoder.layer.1"),
    "torchvision": (tiny_torchvision, "encoder.layers.encoder_layer_1"),
}


def by_hand(model: nn.Module, x: torch.Tensor, layer: str, target: int) -> torch.Tensor:
    """Grad-CAM from a pre-hook on ``layer``: its input tokens' grid part, as the layout says."""
    layout = token_layout(model, tuple(x.shape[-2:]))
    seen = {}

    def keep(_m: nn.Module, args: tuple) -> None:
        args[0].retain_grad()
        seen["tokens"] = args[0]

    handle = model.get_submodule(layer).register_forward_pre_hook(keep)
    try:
        with torch.enable_grad():
            x = x.clone().requires_grad_()
            model(x)[0, target].backward()
    finally:
        handle.remove()
    t = seen["tokens"]
    acts, grads = (v[0, layout.prefix:].T.reshape(-1, *layout.grid) for v in (t.detach(), t.grad))  # (C, h, w)
    cam = F.relu((grads.mean((1, 2))[:, None, None] * acts).sum(0))
    return F.interpolate(cam[None, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]


@pytest.mark.parametrize("which", list(MODELS))
def test_grad_cam_uses_the_model_layout_and_is_not_zero(which: str) -> None:
    build, last_block = MODELS[which]
    model = build()
    assert default_cam_layer(model) == last_block
    x = torch.randn(1, 3, SIDE, SIDE)
    e = grad_cam(model, x, target=2)
    expected = by_hand(model, x, last_block, 2)
    assert expected.abs().max() > 0
    torch.testing.assert_close(torch.as_tensor(e.map), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("which", list(MODELS))
def test_attention_maps_of_foreign_models(which: str) -> None:
    model = MODELS[which][0]()
    x = torch.randn(1, 3, SIDE, SIDE)
    for name in ("attention", "rollout", "gae"):
        e = METHODS[name](model, x)
        assert e is not None and e.map.shape == (SIDE, SIDE) and float(e.map.max()) > 0


def swin(library: str) -> nn.Module:
    if library == "hf":
        return HFClassifier(tiny_hf("swin")).eval()
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=SIDE, patch_size=2, embed_dim=16,
                             depths=(1, 1), num_heads=(1, 2), window_size=4, num_classes=5).eval()


@pytest.mark.parametrize("library, last_stage", [("timm", "layers.1"), ("hf", "model.swin.encoder.layers.1")])
def test_grad_cam_on_swin_reads_the_last_stage(library: str, last_stage: str) -> None:
    """Swin's attention is refused (windows), but Grad-CAM works on its last stage: timm's
    (B, H, W, C) output, or the (B, N, C) tokens entering Hugging Face's; equal to by hand."""
    model = swin(library)
    assert default_cam_layer(model) == last_stage
    x = torch.randn(1, 3, SIDE, SIDE)
    seen = {}

    def keep(_m: nn.Module, args: tuple, out=None) -> None:
        t = out if out is not None else args[0]
        t.retain_grad()
        seen["t"] = t

    layer = model.get_submodule(last_stage)
    handle = layer.register_forward_hook(keep) if library == "timm" else layer.register_forward_pre_hook(keep)
    try:
        with torch.enable_grad():
            model(x.clone().requires_grad_())[0, 1].backward()
    finally:
        handle.remove()
    t = seen["t"]
    if library == "timm":  # (1, H, W, C) -> (C, H, W)
        acts, grads = t.detach()[0].permute(2, 0, 1), t.grad[0].permute(2, 0, 1)
    else:  # (1, N, C) tokens of a square grid
        side = int(t.shape[1] ** 0.5)
        acts, grads = (v[0].T.reshape(-1, side, side) for v in (t.detach(), t.grad))
    cam = F.relu((grads.mean((1, 2))[:, None, None] * acts).sum(0))
    expected = F.interpolate(cam[None, None], size=(SIDE, SIDE), mode="bilinear", align_corners=False)[0, 0]
    e = grad_cam(model, x, target=1)
    assert expected.abs().max() > 0
    torch.testing.assert_close(torch.as_tensor(e.map), expected, atol=1e-5, rtol=1e-4)
