"""AttnLRP through lxt on torchvision ViTs: conservation, the relevance absorbed by the
additive terms, batches, models it does not support, and the shared model left as it was
(also for another thread running a plain forward in the middle of an LRP pass)."""
from __future__ import annotations

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


def test_input_and_additive_relevance_add_up_to_the_logit():
    """With biases, class token and position embedding, the input keeps only part of the logit:
    the rest is their relevance (each additive term times its gradient through the same rules;
    the query and key biases feed the softmax, which the rules cut off). The reported figure is
    exactly that rest."""
    model, x = tiny_vit(), images(1)
    r = lrp.attnlrp(model, x)
    view = lrp.lrp_view(model)
    additive = {n: p for n, p in view.named_parameters()
                if n.endswith("bias") or n in ("class_token", "encoder.pos_embedding")}
    inp = x.clone().requires_grad_()
    logit = view(inp)[0, r.targets[0]]
    grads = torch.autograd.grad(logit, [inp, *additive.values()])
    kept = 0.0
    for (name, p), g in zip(additive.items(), grads[1:]):
        share = p * g
        kept += float((share[2 * len(p) // 3:] if name.endswith("in_proj_bias") else share).detach().sum())  # V only
    inputs = float((inp * grads[0]).detach().sum())
    assert inputs + kept == pytest.approx(float(logit.detach()), rel=1e-4)
    assert r.conservation[0] == pytest.approx(abs(kept) / abs(float(logit.detach())), rel=1e-3)
    assert r.conservation[0] > 0.01  # these terms do keep relevance: the figure is not a constant 0
    assert float(r.tokens.sum()) == pytest.approx(inputs, rel=1e-4)


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
    """hybrid_vit, a CNN and a torchvision ViT with a module lxt's map does not cover: None,
    and the method row says "not available" the way the others do (None)."""
    x = images(1)
    odd = tiny_vit()
    odd.encoder.layers[0].mlp[1] = nn.SiLU()
    for model in (create_model("hybrid_vit", depth=1).eval(), create_model("sa_cnn").eval(), odd):
        assert not lrp.supports(model) and lrp.attnlrp(model, x) is None
        assert explain.METHODS["attnlrp"](model, x) is None
    assert lrp.supports(tiny_vit())


def test_conservation_in_faithfulness_and_explain(tmp_path):
    """``evaluate_methods`` scores AttnLRP with the other methods and adds its mean
    conservation (the table shows it, — for the others); ``write_explanation`` (``visattn
    explain``) stores it in maps.npz and says it in a note."""
    import io

    from PIL import Image

    from visattn.faithfulness import evaluate_methods, markdown_table
    from visattn.inference import prepare, write_explanation

    model, x = tiny_vit(), images(3)
    results = evaluate_methods(model, x, [1, 2, 3], methods=("attnlrp", "saliency", "random"), steps=4)
    assert results["attnlrp"]["conservation"] == pytest.approx(float(lrp.attnlrp(model, x, [1, 2, 3]).conservation.mean()))
    assert "conservation" not in results["saliency"] and 0 <= results["attnlrp"]["deletion_auc"] <= 1
    rows = {line.split(" | ")[0].strip("| "): line for line in markdown_table(results).splitlines()}
    assert "|ΣR − logit| / |logit|" in rows["method"] and rows["saliency"].count("—") == 1
    assert f"{results['attnlrp']['conservation']:.3f}" in rows["attnlrp"]

    meta = {"model": "vit", "classes": [f"c{i}" for i in range(10)], "mean": [0.5] * 3, "std": [0.25] * 3,
            "image_size": SIDE}
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    written, notes = write_explanation(model, meta, buf.getvalue(), tmp_path, ("attnlrp",))
    tensor = prepare(buf.getvalue(), meta)[1]
    e = explain.attnlrp(model, tensor, int(model(tensor).argmax(1)))
    raw = np.load(tmp_path / "maps.npz")
    np.testing.assert_allclose(raw["conservation/attnlrp"], e.conservation, rtol=1e-5)
    np.testing.assert_allclose(raw["explain/attnlrp"], e.map, rtol=1e-5, atol=1e-7)
    assert notes == [f"attnlrp: conservation |Σ relevance − logit| / |logit| = {float(e.conservation[0]):.2%}"]
    assert tmp_path / "attnlrp.png" in written
