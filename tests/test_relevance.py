"""Transformer relevance: a two-token model worked by hand, LRP conservation, batches, no side effects."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from visattn import capture, create_model
from visattn.maps import rollout
from visattn.models.attention import TokenSelfAttention
from visattn.relevance import _as_transformer, _Ops, gae, transformer_attribution


class TwoTokens(nn.Module):
    """Tokens in, (B, 2, 2): a CLS token and one grid token. One head with Q = K = 0 (so
    A = 0.5 everywhere), V and the projection the identity; logits = CLS + attention(CLS)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = TokenSelfAttention(2, 1, grid=(1, 1), prefix=1)
        with torch.no_grad():
            self.attn.qkv.weight.zero_()
            self.attn.qkv.weight[4:].copy_(torch.eye(2))  # V = x
            self.attn.qkv.bias.zero_()
            self.attn.proj.weight.copy_(torch.eye(2))
            self.attn.proj.bias.zero_()

    def forward(self, tokens: Tensor) -> Tensor:
        return (tokens + self.attn(tokens))[:, 0]


def test_two_token_model_by_hand() -> None:
    """x_cls = (1, 0), x_1 = (0, 1): y = x_cls + 0.5 x_cls + 0.5 x_1 = (1.5, 0.5).
    ∂y_c/∂A_0j = x_j[c], ∂y_c/∂A_1j = 0. Class 0: Ā = [[0.5, 0], [0, 0]], R = I + Ā =
    [[1.5, 0], [0, 1]]: the grid token gets 0. Class 1: Ā = [[0, 0.5], [0, 0]], R[0] = (1, 0.5):
    it gets 0.5. Rollout (0.5 A + 0.5 I) gives the CLS row (0.75, 0.25) for either class."""
    model, x = TwoTokens().eval(), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert torch.allclose(model(x), torch.tensor([[1.5, 0.5]]))
    r0, r1 = gae(model, x, 0), gae(model, x, 1)
    assert torch.allclose(r0.tokens, torch.tensor([[1.5, 0.0]]), atol=1e-6)
    assert torch.allclose(r1.tokens, torch.tensor([[1.0, 0.5]]), atol=1e-6)
    assert r0.maps().tolist() == [[[0.0]]] and np.allclose(r1.maps(), 0.5)
    assert gae(model, x).targets == [0]  # the predicted class
    np.testing.assert_allclose(rollout(capture(model, x))[0], [0.75, 0.25], atol=1e-6)


def _tiny(name: str, cls_token: bool = False) -> tuple[nn.Module, int]:
    if name == "hybrid_vit":
        return create_model("hybrid_vit", embed_dim=32, depth=2, heads=2, cls_token=cls_token).eval(), 32
    model = create_model("vit_b_32", image_size=64, num_classes=10).eval()
    model.encoder.layers = model.encoder.layers[:2]
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision starts the head at zero
    return model, 64


@pytest.mark.parametrize("name,cls_token", [("hybrid_vit", False), ("hybrid_vit", True), ("vit_b_32", True)])
def test_transformer_attribution_conserves_the_logit(name: str, cls_token: bool) -> None:
    model, side = _tiny(name, cls_token)
    x = torch.randn(3, 3, side, side)
    spec = _as_transformer(model, (side, side))
    with torch.no_grad():  # the re-run blocks are the model's own: same logits, plain or with LRP rules
        logits = model(x)
        for lrp in (False, True):
            assert torch.allclose(spec.forward(spec.embed(x), _Ops(lrp))[0], logits, atol=1e-5)
    r = transformer_attribution(model, x)
    assert r.targets == logits.argmax(1).tolist()
    assert r.conservation.shape == (3,) and (r.conservation < 0.01).all()  # |Σ R − logit| / |logit|
    assert r.maps().shape == (3, *spec.grid) and (r.maps() >= 0).all() and (r.maps().sum((1, 2)) > 0).all()


@pytest.mark.parametrize("method", [gae, transformer_attribution])
def test_a_batch_equals_one_image_at_a_time_and_targets_matter(method) -> None:
    model, _ = _tiny("hybrid_vit")
    x = torch.randn(3, 3, 32, 32)
    batch = method(model, x, [1, 2, 3])
    for i in range(3):
        one = method(model, x[i : i + 1], i + 1)
        assert torch.allclose(batch.tokens[i], one.tokens[0], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(method(model, x[:1], 1).tokens, method(model, x[:1], 5).tokens)


def test_no_side_effects_and_models_it_does_not_apply_to() -> None:
    model, _ = _tiny("hybrid_vit")
    model.blocks[1].train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    x = torch.randn(1, 3, 32, 32)
    gae_tokens, ta_tokens = gae(model, x).tokens, transformer_attribution(model, x).tokens
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model.requires_grad_(False)  # frozen parameters (another thread's gradient method): same relevance
    assert torch.allclose(gae(model, x).tokens, gae_tokens) and torch.allclose(transformer_attribution(model, x).tokens, ta_tokens)
    sa = create_model("sa_cnn", widths=(8, 16, 16), heads=2).eval()
    assert transformer_attribution(sa, torch.randn(1, 3, 32, 32)) is None  # blocks it does not know
    assert gae(sa, torch.randn(1, 3, 32, 32)).maps().shape == (1, 8, 8)  # any model the capture sees
    assert gae(create_model("seed_cnn").eval(), torch.randn(1, 3, 32, 32)) is None


def test_registered_as_explanation_methods() -> None:
    from visattn import explain
    from visattn.maps import upsample

    model, _ = _tiny("hybrid_vit")
    x = torch.randn(1, 3, 32, 32)
    for name, method in (("gae", gae), ("transformer_attribution", transformer_attribution)):
        e = explain.METHODS[name](model, x, 3)
        assert e.name == name and e.target == 3 and e.map.shape == (32, 32) and (e.map >= 0).all()
        np.testing.assert_allclose(e.map, upsample(method(model, x, 3).maps()[0], (32, 32)), atol=1e-6)
    assert explain.METHODS["transformer_attribution"](create_model("seed_cnn").eval(), x) is None
