"""The CAM family through pytorch-grad-cam: maps, locality on a hand-built model, no side effects."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("pytorch_grad_cam")

from visattn import create_model, explain  # noqa: E402
from visattn.cams import CAMS, cam_maps  # noqa: E402


class Quadrant(nn.Module):
    """feat = 1×1 conv of the image (positive weights); logit 0 = mean of feat over the
    top-left quadrant, logit 1 = 0: only the quadrant's activations matter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        nn.init.constant_(self.conv.weight, 0.5)
        self.bn = nn.BatchNorm2d(2)  # a module whose train/eval flag must survive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x)
        logit = f[:, :, :8, :8].mean(dim=(1, 2, 3)) + 0 * self.bn(f).mean(dim=(1, 2, 3))
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


@pytest.mark.parametrize("method", ["hires_cam", "layer_cam"])
def test_elementwise_cams_find_the_quadrant(method: str) -> None:
    x = 0.5 + 0.5 * torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    maps, targets = cam_maps(method, Quadrant().eval(), x, 0, layer="conv")
    assert targets == [0, 0] and maps.shape == (2, 16, 16)
    inside, outside = maps[:, :8, :8], maps.copy()
    outside[:, :8, :8] = np.nan
    assert inside.mean() > 0.3 and np.nanmax(outside) < 0.05


def test_every_cam_on_a_batch_and_no_side_effects(one_thread) -> None:
    model = create_model("sa_cnn", widths=(8, 16, 16), heads=2).eval()
    model.stages[1][1].q.train()  # a mixed mode the caller chose (on a conv: the maps stay batch-independent)
    model.stem.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for method in CAMS:
        maps, targets = cam_maps(method, model, x, [1, 2], batch_size=64)
        assert maps.shape == (2, 32, 32) and maps.dtype == np.float32 and targets == [1, 2]
        assert (maps >= 0).all() and (maps <= 1 + 1e-6).all()
        e = explain.METHODS[method](model, x[:1], 1)
        assert e.name == method and e.map.shape == (32, 32)
        np.testing.assert_allclose(e.map, maps[0], atol=1e-5)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_constant_map_says_so() -> None:
    class Blind(nn.Module):  # the target logit ignores the image: every gradient CAM is flat
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([0 * self.conv(x).mean(dim=(1, 2, 3)), torch.ones(len(x))], dim=1)

    e = explain.METHODS["hires_cam"](Blind().eval(), torch.rand(1, 3, 16, 16), 0, layer="conv")
    assert e.constant and not explain.METHODS["hires_cam"](Quadrant().eval(), torch.rand(1, 3, 16, 16), 0,
                                                           layer="conv").constant
