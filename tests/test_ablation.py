"""Head ablation and patching: checked against independent hooks at the output projection."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from tests.conftest import small_config
from visattn import capture, create_model
from visattn.ablation import AblationError, ablate, head_importance, head_outputs, patch, patching_effects

FAMILIES = ("sa_cnn", "hybrid_vit", "vit_b_32")


def _model(name: str) -> tuple[nn.Module, int]:
    cfg, side = small_config(name)
    if name == "vit_b_32":  # two encoder layers keep the torchvision ViT quick
        cfg = {**cfg, "image_size": 64}
        side = 64
    model = create_model(name, **cfg, **({"gate_init": 1.0} if name == "sa_cnn" else {})).eval()
    if name == "vit_b_32":
        model.encoder.layers = model.encoder.layers[:2]
        nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero
    return model, side


def _close(a: Tensor, b: Tensor, rel: float = 1e-4) -> bool:
    """Equal up to ``rel`` of b's largest entry (untrained sa_cnn logits are ~1e-5)."""
    return bool((a - b).abs().max() <= rel * b.abs().max())


def _proj(model: nn.Module, layer: str) -> tuple[nn.Module, int]:
    """The output projection of an attention layer and the channel dim of its input."""
    m = model.get_submodule(layer)
    proj = getattr(m, "proj", None) or m.out_proj
    return proj, 1 if isinstance(proj, nn.Conv2d) else -1


def _reference(model: nn.Module, x: Tensor, layer: str, heads: list[int], fill: Tensor | None = None) -> Tensor:
    """Logits with the heads' channels at the projection's input set to 0 (or to ``fill``),
    by a forward pre-hook, not through visattn's edit mechanism."""
    proj, dim = _proj(model, layer)
    d = model.get_submodule(layer).proj.in_channels if dim == 1 else proj.in_features
    d //= len(head_outputs(model, x[:1])[1][layer][0])

    def hook(_m: nn.Module, args: tuple[Tensor]) -> tuple[Tensor]:
        y = args[0].clone()
        for h in heads:
            idx = [slice(None)] * y.dim()
            idx[dim] = slice(h * d, (h + 1) * d)
            y[tuple(idx)] = 0.0 if fill is None else fill[tuple(idx[1:])]
        return (y,)

    handle = proj.register_forward_pre_hook(hook)
    try:
        return capture(model, x).logits  # capture routes nn.MultiheadAttention through out_proj
    finally:
        handle.remove()


def _proj_inputs_mean(model: nn.Module, x: Tensor, layer: str) -> Tensor:
    proj, _ = _proj(model, layer)
    seen = []
    handle = proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        capture(model, x)
    finally:
        handle.remove()
    return seen[0].mean(0)


@pytest.mark.parametrize("name", FAMILIES)
def test_zero_ablation_equals_zeroed_projection_input(name: str, one_thread) -> None:
    model, side = _model(name)
    x = torch.randn(2, 3, side, side)
    layers = list(capture(model, x[:1]).attention)
    layer = layers[-1]
    got = ablate(model, x, {layer: [0]})
    with torch.no_grad():
        plain = model(x)
    assert _close(got, _reference(model, x, layer, [0]))
    assert not _close(got, plain, 1e-2)  # the head mattered
    assert _close(ablate(model, x, {}), plain)


@pytest.mark.parametrize("name", ("sa_cnn", "hybrid_vit"))
def test_mean_ablation_equals_projection_input_mean(name: str, one_thread) -> None:
    model, side = _model(name)
    x, ref = torch.randn(2, 3, side, side), torch.randn(5, 3, side, side)
    layer = list(capture(model, x[:1]).attention)[-1]
    fill = _proj_inputs_mean(model, ref, layer)
    got = ablate(model, x, {layer: [1]}, mode="mean", reference=ref)
    assert _close(got, _reference(model, x, layer, [1], fill), 1e-6)
    with torch.no_grad():
        assert not _close(got, model(x), 1e-4)


def test_plain_logits_are_exact_for_own_families(one_thread) -> None:
    model, _ = _model("sa_cnn")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ablate(model, x, {}), model(x))


def test_model_unchanged_afterwards(one_thread) -> None:
    model, side = _model("hybrid_vit")
    model.blocks[0].train()  # a mixed mode the caller chose stays as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    x = torch.randn(2, 3, side, side)
    ablate(model, x, {"blocks.0.attn": [0, 1]}, mode="mean")
    head_importance(model, x)
    patching_effects(model, x[:1], x[1:])
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    for m in model.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)
    assert all(p.grad is None for p in model.parameters())


def test_two_threads_ablating_different_heads_do_not_mix(one_thread) -> None:
    model, side = _model("hybrid_vit")
    x = torch.randn(1, 3, side, side)
    specs = [{"blocks.0.attn": [0]}, {"blocks.1.attn": [1]}]
    expected = [ablate(model, x, s) for s in specs]
    assert not torch.allclose(expected[0], expected[1])
    barrier, errors = threading.Barrier(3), []

    def worker(i: int) -> None:
        for _ in range(20):
            barrier.wait()
            if not torch.equal(ablate(model, x, specs[i]), expected[i]):
                errors.append(i)

    def plain() -> None:
        for _ in range(20):
            barrier.wait()
            with torch.no_grad():
                if not torch.equal(model(x), plain_logits):
                    errors.append("plain")

    with torch.no_grad():
        plain_logits = model(x)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)] + [threading.Thread(target=plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("mode", ("zero", "mean"))
def test_head_importance_equals_one_ablation_per_head(mode: str, one_thread) -> None:
    model, side = _model("sa_cnn")
    x = torch.randn(3, 3, side, side)
    fx = head_importance(model, x, mode=mode)
    assert fx.layers == ["stages.0.1", "stages.1.1"] and fx.heads == [2, 2]
    with torch.no_grad():
        base = model(x)
    t = base.argmax(1)
    assert fx.targets == t.tolist()
    for i, layer in enumerate(fx.layers):
        for h in range(2):
            logits = ablate(model, x, {layer: [h]}, mode=mode)
            expect = (logits - base).gather(1, t[:, None])[:, 0].numpy()
            expect_p = (logits.softmax(1) - base.softmax(1)).gather(1, t[:, None])[:, 0].numpy()
            np.testing.assert_allclose(fx.logit[:, i, h], expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())
            np.testing.assert_allclose(fx.prob[:, i, h], expect_p, rtol=1e-4, atol=1e-4 * np.abs(expect_p).max())


def test_head_importance_pads_layers_with_fewer_heads(one_thread) -> None:
    model = create_model("sa_cnn", **small_config("sa_cnn")[0])
    model.stages[1][1] = type(model.stages[1][1])(16, 4, (8, 8))  # a layer with 4 heads after one with 2
    fx = head_importance(model.eval(), torch.randn(1, 3, 32, 32), targets=[3])
    assert fx.heads == [2, 4] and fx.targets == [3]
    assert np.isnan(fx.logit[0, 0, 2:]).all() and np.isfinite(fx.logit[0, 1]).all()


def test_patching_all_heads_restores_the_layer_output(one_thread) -> None:
    model, side = _model("hybrid_vit")
    clean, corrupted = torch.randn(1, 3, side, side), torch.randn(1, 3, side, side)
    layer = "blocks.1.attn"
    proj, _ = _proj(model, layer)
    seen: list[Tensor] = []
    handle = proj.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            model(clean)
            model(corrupted)
        patched = patch(model, corrupted, clean, {layer: [0, 1]})
    finally:
        handle.remove()
    clean_out, corrupt_out, patched_out = seen[0], seen[1], seen[-1]  # patch() reruns clean in between
    assert torch.allclose(patched_out, clean_out, atol=1e-5)
    assert not torch.allclose(corrupt_out, clean_out, atol=1e-3)
    with torch.no_grad():
        assert not torch.allclose(patched, model(corrupted), atol=1e-4)


def test_patching_effects_equal_one_patch_per_head(one_thread) -> None:
    model, side = _model("hybrid_vit")
    clean, corrupted = torch.randn(2, 3, side, side), torch.randn(2, 3, side, side) * 2
    fx = patching_effects(model, clean, corrupted)
    with torch.no_grad():
        lc, lx = model(clean), model(corrupted)
    c, c2 = lc.argmax(1), lx.argmax(1)

    def ld(logits: Tensor) -> Tensor:
        a = logits.gather(1, c[:, None])[:, 0]
        return torch.where(c == c2, a, a - logits.gather(1, c2[:, None])[:, 0])

    for i, layer in enumerate(fx.layers):
        for h in range(2):
            want = (ld(patch(model, corrupted, clean, {layer: [h]})) - ld(lx)) / (ld(lc) - ld(lx))
            np.testing.assert_allclose(fx.logit[:, i, h], want.numpy(), rtol=1e-4, atol=1e-5)
    same = patching_effects(model, clean, clean)
    assert np.isnan(same.logit).all()  # nothing to restore


def test_bad_requests_are_one_line_errors(one_thread) -> None:
    model, side = _model("hybrid_vit")
    x = torch.randn(1, 3, side, side)
    with pytest.raises(AblationError, match="no attention layer 'blocks.9.attn'; this model has blocks.0.attn, blocks.1.attn"):
        ablate(model, x, {"blocks.9.attn": [0]})
    with pytest.raises(AblationError, match="no attention layer 'blocks'"):
        patch(model, x, x, {"blocks": [0]})
    with pytest.raises(AblationError, match="no head 5"):
        ablate(model, x, {"blocks.0.attn": [5]})
    with pytest.raises(AblationError, match="unknown mode"):
        ablate(model, x, {"blocks.0.attn": [0]}, mode="resample")
    with pytest.raises(AblationError, match="reference set"):
        ablate(model, x, {"blocks.0.attn": [0]}, mode="mean")
    with pytest.raises(AblationError, match="no attention heads"):
        head_importance(create_model("seed_cnn").eval(), torch.randn(1, 3, 32, 32))
