"""Tests for visattn.explain: shapes and invariants on a tiny sa_cnn, known answers on a
hand-built model, token layers, flags restored, and no cross-talk between threads."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from visattn import explain, layers
from visattn.explain import (
    ExplainError, Explanation, attention_map, default_cam_layer, explain_all, grad_cam, list_cam_layers, rollout,
    saliency,
)
from visattn.models import create_model

SIDE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return create_model("sa_cnn", widths=(8, 16, 16), heads=2).eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def check(e: Explanation, name: str, side: int = SIDE) -> None:
    assert e.name == name
    assert e.map.shape == (side, side) and e.map.dtype == np.float32
    assert np.isfinite(e.map).all() and (e.map >= 0).all()
    assert e.seconds > 0 and isinstance(e.target, int)


FAST = {
    "grad_cam": {}, "saliency": {}, "integrated_gradients": {"steps": 8, "internal_batch_size": 8},
    "occlusion": {"window": 8, "stride": 4}, "attention": {}, "rollout": {},
}


@pytest.mark.parametrize("name", list(FAST))
def test_each_method_gives_a_nonnegative_map_at_input_size(tiny, name):
    e = explain.METHODS[name](tiny, images(1), 3, **FAST[name])
    check(e, name)
    assert e.target == 3


def test_predicted_target_and_explain_all(tiny):
    x = images(1, seed=1)
    predicted = int(tiny(x).argmax(1))
    assert saliency(tiny, x).target == predicted
    out = explain_all(tiny, x, methods=("attention", "saliency", "grad_cam"))
    assert sorted(out) == ["attention", "grad_cam", "saliency"]
    assert {e.target for e in out.values()} == {predicted}
    with pytest.raises(ExplainError):
        explain_all(tiny, x, methods=("nope",))


def test_cam_layers_and_chosen_layer(tiny):
    names = list_cam_layers(tiny)
    assert {"stages.0", "stages.1.1", "stages.2"} <= set(names)
    assert default_cam_layer(tiny) == "stages.2"
    x = images(1)
    for layer in ("stages.1.1", tiny.stages[0]):
        check(grad_cam(tiny, x, 0, layer=layer), "grad_cam")
    assert not np.allclose(grad_cam(tiny, x, 0, "stages.1.1").map, grad_cam(tiny, x, 0, "stages.0").map)
    with pytest.raises(ExplainError):
        grad_cam(tiny, x, 0, layer="stages.9")
    with pytest.raises(ExplainError):
        grad_cam(tiny, x, 0, layer=nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize("cls_token", [False, True])
def test_token_models(cls_token):
    model = create_model("hybrid_vit", embed_dim=16, depth=1, heads=2, cls_token=cls_token).eval()
    assert default_cam_layer(model) == "tokenizer" and "blocks.0" in list_cam_layers(model)
    x = images(1)
    e = grad_cam(model, x, 1, layer="blocks.0")  # tokens (B, N, C) explained on their grid
    check(e, "grad_cam")
    assert e.map.max() > 0
    check(rollout(model, x, 1, head_fusion="max"), "rollout")


def test_models_without_attention_sites_give_none():
    seed = create_model("seed_cnn").eval()
    assert attention_map(seed, images(1)) is None and rollout(seed, images(1)) is None
    assert default_cam_layer(seed) == "conv2"
    assert set(explain_all(seed, images(1), methods=("attention", "saliency"))) == {"saliency"}


def test_model_flags_restored_and_no_parameter_grads(tiny):
    tiny.requires_grad_(False)
    try:
        for name in ("grad_cam", "saliency", "integrated_gradients"):
            explain.METHODS[name](tiny, images(1), 2, **FAST[name])
        assert not any(p.requires_grad for p in tiny.parameters())
    finally:
        tiny.requires_grad_(True)
        tiny.stem.conv.weight.requires_grad_(False)
    grad_cam(tiny, images(1), 2)
    assert not tiny.training and all(p.grad is None for p in tiny.parameters())
    assert tiny.stem.conv.weight.requires_grad is False and tiny.head.fc.weight.requires_grad


class Quadrant(nn.Module):
    """Logit 0 = mean intensity of the top-left 8×8 quadrant of a 16×16 image; logit 1 = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.gray = nn.Conv2d(3, 1, 1, bias=False)
        nn.init.constant_(self.gray.weight, 1 / 3)
        mask = torch.zeros(1, 1, 16, 16)
        mask[..., :8, :8] = 4.0  # global average × 4 = mean over the quadrant
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = (self.gray(x) * self.mask).mean(dim=(1, 2, 3))
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


@pytest.mark.parametrize("name", ["saliency", "integrated_gradients", "occlusion"])
def test_methods_find_the_quadrant(name):
    x = 0.5 + 0.5 * torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    m = explain.METHODS[name](Quadrant().eval(), x, 0).map
    inside = m[:8, :8].mean()
    outside = (m.sum() - m[:8, :8].sum()) / (m.size - 64)
    assert inside > 3 * outside and m[:8, :8].sum() > 0.5 * m.sum()


def test_threads_share_a_model_without_cross_talk(tiny):
    x = images(4, seed=5)
    expected = [grad_cam(tiny, x[i : i + 1], 1).map for i in range(4)]
    got: dict[int, list[np.ndarray]] = {i: [] for i in range(4)}
    barrier = threading.Barrier(4)

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(3):
            got[i].append(grad_cam(tiny, x[i : i + 1], 1).map)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert len(got[i]) == 3
        for m in got[i]:
            np.testing.assert_allclose(m, expected[i], rtol=1e-5, atol=1e-9)
    assert not any(m._forward_hooks or isinstance(m, layers.GridProbe) for m in tiny.modules())



def test_grad_cam_on_a_vit_block_uses_the_grid_its_attention_site_records():
    """Tokens entering a torchvision encoder layer (CLS + 3×3 patches) are explained on the
    grid and prefix of the model's token layout, the one its attention site records."""
    from visattn import capture

    model = create_model("vit_b_16", image_size=48, num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision starts the head at zero: no gradient
    x = torch.rand(1, 3, 48, 48)
    site = capture(model, x).attention["encoder.layers.encoder_layer_1.self_attention"]
    view, _ = layers.probed_view(model, "encoder.layers.encoder_layer_1", (48, 48))
    probe = view.encoder.layers.encoder_layer_1
    assert isinstance(probe, layers.GridProbe)
    assert probe.layout(10) == (site.grid, site.prefix) == ((3, 3), 1)
    e = grad_cam(model, x, 2, layer="encoder.layers.encoder_layer_1")
    check(e, "grad_cam", side=48)
    assert e.map.max() > 0


def test_method_table_is_complete_and_callable(tiny):
    """One row per method: its name, a label, the function it calls, slow or not, whether it
    takes a layer (then it accepts ``layer=``), and whether it needs attention."""
    assert list(explain.METHODS) == ["attention", "rollout", "gae", "transformer_attribution", "attnlrp", "grad_cam",
                                     "integrated_gradients", "saliency", "occlusion", "score_cam", "grad_cam_plus_plus",
                                     "xgrad_cam", "layer_cam", "hires_cam", "eigen_cam"]
    assert len({m.label for m in explain.METHODS.values()}) == len(explain.METHODS)
    assert {n for n, m in explain.METHODS.items() if m.slow} == {"integrated_gradients", "occlusion", "score_cam"}
    for name, m in explain.METHODS.items():
        assert m.name == name and explain.method(name) is m
        if m.takes_layer:
            layer = "stages.1.1" if m.needs_attention else "stages.1"
            check(m(tiny, images(1), 3, layer=layer, **FAST.get(name, {})), name)
    with pytest.raises(ExplainError, match="unknown method"):
        explain.method("nope")


BATCH_OPTIONS = {**FAST, "score_cam": {"layer": "stages.2"}}


def tv_vit() -> nn.Module:
    """A tiny torchvision ViT (AttnLRP's model) whose head is not torchvision's zeros."""
    model = torchvision.models.VisionTransformer(SIDE, 8, 2, 2, 16, 32, num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight, generator=torch.Generator().manual_seed(0))
    return model


@pytest.mark.parametrize("name", list(explain.METHODS))
def test_a_batch_gives_each_image_the_map_it_gets_alone(tiny, name):
    """Every method takes (B, 3, H, W) and returns B maps: image i's map and target are the
    ones it gets alone, with the predicted classes and with one given target per image."""
    model = {"transformer_attribution": lambda: create_model("hybrid_vit", embed_dim=16, depth=2, heads=2).eval(),
             "attnlrp": tv_vit}.get(name, lambda: tiny)()
    x, m = images(3, seed=7), explain.METHODS[name]
    options = BATCH_OPTIONS.get(name, {})
    for target in (None, [1, 4, 7]):
        batch = m(model, x, target, **options)
        assert batch.maps.shape == (3, SIDE, SIDE) and len(batch) == 3
        with pytest.raises(ExplainError, match="holds 3 maps"):
            batch.map
        for i in range(3):
            alone = m(model, x[i : i + 1], None if target is None else target[i], **options)
            check(batch[i], name)
            assert batch[i].target == alone.target
            np.testing.assert_allclose(batch.maps[i], alone.map, rtol=1e-4, atol=1e-5 * max(float(alone.map.max()), 1e-3))
        assert target is None or batch.targets == target
    with pytest.raises(ExplainError, match="2 targets for 3 images"):
        m(model, x, [1, 2], **options)
