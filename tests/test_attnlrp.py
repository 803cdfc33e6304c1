"""AttnLRP through lxt's rules on torchvision and timm ViTs and hybrid_vit: conservation, the
relevance absorbed by the additive terms, batches, models it does not support, and the shared model left as it was
(also for another thread running a plain forward in the middle of an LRP pass)."""
from __future__ import annotations

import importlib.util
import threading

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from visattn import attnlrp as lrp
from visattn import create_model, explain
from visattn.explain import ExplainError
from visattn.tracing import capture

pytest.importorskip("lxt")
SIDE, PATCH = 32, 8


def tiny_vit(additive: bool = True, seed: int = 0) -> nn.Module:
    """A 2-block torchvision ViT (4×4 patches); ``additive=False`` zeroes every bias, the
    class token and the position embedding (then LRP's relevance has nowhere else to go)."""
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(SIDE, PATCH, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                                                 num_classes=10).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # torchvision starts the head, biases and class token at 0
            if not (name.endswith("bias") or name in ("class_token", "encoder.pos_embedding")):
                p.add_(torch.randn_like(p) * 0.3)
            elif additive:
                p.add_(torch.randn_like(p) * 0.5)
            else:
                p.zero_()
    return model


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def test_conservation_without_additive_terms():
    """With no bias, class token or position embedding, the input relevance sums to the
    logit (lxt's rules conserve); the map is that relevance summed per patch."""
    model, x = tiny_vit(additive=False), images(3)
    r = lrp.attnlrp(model, x, [1, 2, 3])
    assert r.targets == [1, 2, 3] and r.grid == (4, 4) and r.prefix == 0
    assert r.conservation.shape == (3,) and (r.conservation < 0.01).all(), r.conservation
    logits = model(x).detach()
    chosen = logits[torch.arange(3), torch.tensor([1, 2, 3])]
    torch.testing.assert_close(r.tokens.sum(1), chosen, rtol=1e-3, atol=1e-5)
    assert (r.tokens < 0).any() and (r.tokens > 0).any()  # signed relevance; the map keeps the positive part
    np.testing.assert_allclose(r.maps(), r.tokens.clamp(min=0).reshape(3, 4, 4).numpy())


def _family(name: str) -> nn.Module:
    from tests.foreign_models import lively, tiny_timm

    if name == "torchvision":
        return tiny_vit()
    if name.startswith("hybrid_vit"):
        model = lively(create_model("hybrid_vit", depth=2, cls_token=name.endswith("cls")).eval())
        for m in model.modules():  # BatchNorm's running mean is a constant offset, not a parameter: 0 here,
            if isinstance(m, nn.BatchNorm2d):  # so that every additive term is a parameter the test can read
                m.running_mean.zero_()
        return model
    pytest.importorskip("timm")
    if name == "timm_avg":
        return lively(tiny_timm("vit", global_pool="avg", class_token=False))
    return lively(tiny_timm(name.removeprefix("timm_")))


ADDITIVE = {"class_token", "pos_embedding", "cls", "pos_embed", "cls_token", "reg_token", "dist_token"}
FAMILIES = ("torchvision", "timm_vit", "timm_vit_qknorm", "timm_vit_registers", "timm_deit_distilled", "timm_avg",
            "hybrid_vit", "hybrid_vit_cls")


@pytest.mark.parametrize("family", FAMILIES)
def test_input_and_additive_relevance_add_up_to_the_logit(family):
    """With biases, class/register tokens and position embedding, the input keeps only part of
    the logit: the rest is their relevance (each additive term times its gradient through the
    same rules; the query and key biases and q/k norms feed the softmax, which the rules cut
    off, so they are not counted). Input plus additive relevance is the logit on every
    supported family (no path escapes the rules); the reported figure is exactly the rest."""
    model, x = _family(family), images(1)
    assert lrp.supports(model)
    r = lrp.attnlrp(model, x)
    view = lrp.lrp_view(model)
    torch.testing.assert_close(view(x), model(x), rtol=1e-5, atol=1e-5)
    additive = {n: p for n, p in view.named_parameters() if n.rsplit(".", 1)[-1] in ADDITIVE
                or (n.endswith("bias") and "q_norm" not in n and "k_norm" not in n)}
    inp = x.clone().requires_grad_()
    logit = view(inp)[0, r.targets[0]]
    grads = torch.autograd.grad(logit, [inp, *additive.values()], allow_unused=True)
    kept = 0.0
    for (name, p), g in zip(additive.items(), grads[1:]):
        share = p * (torch.zeros_like(p) if g is None else g)
        kept += float((share[2 * len(p) // 3:] if name.endswith("in_proj_bias") else share).detach().sum())  # V only
    inputs, logit = float((inp * grads[0]).detach().sum()), float(logit.detach())
    assert inputs + kept == pytest.approx(logit, rel=1e-4, abs=1e-5)
    assert r.conservation[0] == pytest.approx(abs(kept) / abs(logit), rel=1e-3, abs=1e-6)
    assert r.conservation[0] > 0.01  # these terms do keep relevance: the figure is not a constant 0
    assert float(r.tokens.sum()) == pytest.approx(inputs, rel=1e-4, abs=1e-6)
    assert r.grid == ((8, 8) if family.startswith("hybrid") else (4, 4))


def test_view_computes_the_model_and_leaves_it_alone():
    model, x = tiny_vit(), images(2)
    view = lrp.lrp_view(model)
    torch.testing.assert_close(view(x), model(x))
    assert type(view.encoder.layers[0].mlp[1]).__name__ == "LXTGELU" and type(model.encoder.layers[0].mlp[1]) is nn.GELU
    assert all(a is b for a, b in zip(view.parameters(), model.parameters()))  # shared tensors, no copy
    assert nn.GELU.forward is not lrp._rules()[nn.GELU].forward  # torch.nn itself untouched


def test_batch_equals_each_image_alone():
    model, x = tiny_vit(), images(2, seed=5)
    batch = explain.attnlrp(model, x, [4, 6])
    for i, t in enumerate([4, 6]):
        alone = explain.attnlrp(model, x[i : i + 1], t)
        np.testing.assert_allclose(batch.maps[i], alone.map, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(batch.conservation[i], alone.conservation[0], rtol=1e-4, atol=1e-7)
        assert batch[i].conservation.shape == (1,)
    with pytest.raises(ExplainError, match="2 targets for 3 images"):
        explain.attnlrp(model, images(3), [1, 2])


def test_model_unchanged_and_other_threads_unaffected(monkeypatch):
    """After AttnLRP the model's parameters, classes, modes, hooks, plain forward and capture
    are as before; another thread's plain forward, capture and saliency run in the middle of
    the LRP pass (from a hook on the private copy) give exactly what they give alone."""
    model, x = tiny_vit(), images(1)
    model.encoder.train()  # a mode LRP must not change (it runs its copy in eval)
    model.encoder.dropout.p = 0.0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    plain, attention = model(x).detach(), capture(model, x).attention
    sal = explain.saliency(model, x, 3).map
    alone = lrp.attnlrp(model, x, 3)

    during = {}

    def other_thread() -> None:
        during["logits"] = model(x).detach()
        during["attention"] = capture(model, x).attention
        during["saliency"] = explain.saliency(model, x, 3).map

    built = lrp.lrp_view

    def view_with_a_pause(m):
        view = built(m)

        def run_other(*_):
            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
        view.encoder.layers[1].register_forward_pre_hook(run_other)
        return view

    monkeypatch.setattr(lrp, "lrp_view", view_with_a_pause)
    with_other = lrp.attnlrp(model, x, 3)
    monkeypatch.undo()

    torch.testing.assert_close(during["logits"], plain, rtol=0, atol=0)
    np.testing.assert_array_equal(during["saliency"], sal)
    for name, site in attention.items():
        torch.testing.assert_close(during["attention"][name].weights, site.weights, rtol=0, atol=0)
    torch.testing.assert_close(with_other.tokens, alone.tokens, rtol=0, atol=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [type(m) for m in model.modules()] == classes and [p.requires_grad for p in model.parameters()] == flags
    assert model.encoder.training and not model.heads.training
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model(x), plain, rtol=0, atol=0)
    after = capture(model, x).attention
    assert all(torch.equal(after[n].weights, s.weights) for n, s in attention.items())


def test_models_it_does_not_support():
    """A Hugging Face ViT, a CNN, a timm ViT with an attention-pool head, a torchvision ViT
    with a module the rules do not cover and an attention without a fused qkv layer: None, and the method row says "not available" the
    way the others do (None)."""
    from tests.foreign_models import tiny_hf, tiny_timm

    x = images(1)
    odd = tiny_vit()
    odd.encoder.layers[0].mlp[1] = nn.SiLU()
    unfused = create_model("hybrid_vit", depth=1).eval()
    unfused.blocks[0].attn.qkv = nn.Identity()  # no fused query-key-value layer to hold
    others = [create_model("sa_cnn").eval(), odd, unfused, tiny_hf("vit")]
    if importlib.util.find_spec("timm") is not None:
        others.append(tiny_timm("vit", global_pool="map"))
    reasons = ["not to a SACNN", "its encoder.layers.encoder_layer_0.mlp.1 (SiLU) is a module that no LRP rule",
               "its blocks.0.attn has no fused query-key-value layer", "not to a ViTForImageClassification (lxt "
               "patches Hugging Face models process-wide", "its attn_pool (AttentionPoolLatent) is a module that"]
    for model, reason in zip(others, reasons):
        assert not lrp.supports(model) and lrp.attnlrp(model, x) is None
        assert explain.METHODS["attnlrp"](model, x) is None
        why = explain.why_unavailable(model, x, "attnlrp", True)
        assert why == lrp.unsupported(model) and reason in why and "\n" not in why
    assert lrp.supports(tiny_vit()) and lrp.supports(create_model("hybrid_vit", depth=1).eval())
