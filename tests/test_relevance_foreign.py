"""GAE and transformer attribution on timm and Hugging Face ViTs: equal to the same weights in
torchvision's ViT (where the architectures are the same), GAE equal to Chefer's formula
recomputed by hand from the attention the model itself returns and its gradient, LRP
relevance conserved on every family, and a plain reason for the variants it refuses."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tests.foreign_models import SIDE, TINY_TIMM, lively, tiny_hf, tiny_timm
from visattn.relevance import _as_transformer, _Ops, gae, transformer_attribution, unsupported
from visattn.sources import HFClassifier

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def hf(family: str, **extra) -> nn.Module:
    return lively(HFClassifier(tiny_hf(family, **extra)).eval())


FAMILIES = {**{f"timm {f}": (lambda f=f: lively(tiny_timm(f))) for f in TINY_TIMM},
            "timm average pool": lambda: lively(tiny_timm("vit", global_pool="avg", class_token=False)),
            **{f"hf {f}": (lambda f=f: hf(f)) for f in ("vit", "deit", "dinov2_registers")}}


def torchvision_copy(model: nn.Module) -> nn.Module:
    """The same ViT in torchvision: a timm ``vit`` or a Hugging Face ViT's weights copied."""
    import torchvision

    timm_side = not isinstance(model, HFClassifier)
    inner = model if timm_side else model.model
    blocks = inner.blocks if timm_side else inner.vit.layers
    hidden = (blocks[0].mlp.fc1.out_features)
    tv = torchvision.models.VisionTransformer(SIDE, 8, len(blocks), 2, 32, hidden, num_classes=5).eval()
    with torch.no_grad():
        if timm_side:
            pairs = [(tv.conv_proj, inner.patch_embed.proj), (tv.encoder.ln, inner.norm), (tv.heads.head, inner.head)]
            tv.class_token.copy_(inner.cls_token)
            tv.encoder.pos_embedding.copy_(inner.pos_embed)
        else:
            emb = inner.vit.embeddings
            pairs = [(tv.conv_proj, emb.patch_embeddings.projection), (tv.encoder.ln, inner.vit.layernorm),
                     (tv.heads.head, inner.classifier)]
            tv.class_token.copy_(emb.cls_token)
            tv.encoder.pos_embedding.copy_(emb.position_embeddings)
        for layer, b in zip(tv.encoder.layers, blocks):
            if timm_side:
                pairs += [(layer.ln_1, b.norm1), (layer.self_attention.out_proj, b.attn.proj), (layer.ln_2, b.norm2)]
                w, bias = b.attn.qkv.weight, b.attn.qkv.bias
            else:
                a = b.attention
                pairs += [(layer.ln_1, b.layernorm_before), (layer.self_attention.out_proj, a.o_proj),
                          (layer.ln_2, b.layernorm_after)]
                w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
                bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            layer.self_attention.in_proj_weight.copy_(w)
            layer.self_attention.in_proj_bias.copy_(bias)
            pairs += [(layer.mlp[0], b.mlp.fc1), (layer.mlp[3], b.mlp.fc2)]
        for mine, theirs in pairs:
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
    return tv


@pytest.mark.parametrize("library", ["timm", "hf"])
def test_equal_to_the_same_weights_in_torchvision(library: str) -> None:
    model = lively(tiny_timm("vit")) if library == "timm" else hf("vit", layer_norm_eps=1e-6)  # torchvision's eps
    tv = torchvision_copy(model)
    x = torch.randn(3, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x), atol=1e-5, rtol=1e-5)
    for method in (transformer_attribution, gae):
        mine, theirs = method(model, x, [0, 2, 4]), method(tv, x, [0, 2, 4])
        assert mine.prefix == theirs.prefix == 1 and mine.grid == theirs.grid == (4, 4)
        scale = float(theirs.tokens[:, 1:].abs().max())
        assert scale > 0.01
        torch.testing.assert_close(mine.tokens, theirs.tokens, atol=1e-5 * scale, rtol=1e-4)
    ta = transformer_attribution(model, x, [0, 2, 4])
    assert (ta.conservation < 0.01).all()
    assert not torch.allclose(ta.tokens, gae(model, x, [0, 2, 4]).tokens, atol=0.01)  # two different methods


def captured_by_hand(model: nn.Module, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
    """(attention weights per layer, the last layer's attention output before its
    projection, logits), read from the model's own modules: timm's unfused attention
    (its ``attn_drop`` gets the weights, ``norm`` the output), Hugging Face's eager
    attention (``output_attentions``; ``o_proj``'s input)."""
    weights, context = [], []

    def keep(into: list):
        def hook(_m, args, out=None):
            t = out if out is not None else args[0]
            t.retain_grad()
            into.append(t)
        return hook

    handles = []
    if isinstance(model, HFClassifier):
        inner = model.model
        inner.set_attn_implementation("eager")
        last = [m for n, m in inner.named_modules() if n.endswith("attention")][-1]
        handles.append(last.o_proj.register_forward_pre_hook(keep(context)))
    else:
        for b in model.blocks:
            b.attn.fused_attn = False
            handles.append(b.attn.attn_drop.register_forward_hook(keep(weights)))
        handles.append(model.blocks[-1].attn.norm.register_forward_hook(keep(context)))
    try:
        with torch.enable_grad():
            if isinstance(model, HFClassifier):
                out = model.model(pixel_values=x, output_attentions=True)
                logits, weights = out.logits, list(out.attentions)
                for w in weights:
                    w.retain_grad()
            else:
                logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return weights, context[0], logits


@pytest.mark.parametrize("which", ["timm vit", "timm deit_distilled", "timm vit_registers", "hf vit",
                                   "hf dinov2_registers"])
def test_gae_equals_chefer_by_hand(which: str) -> None:
    """R = I, R ← R + mean_h((∇A ⊙ A)⁺) R per layer; read out the rows weighted by the last
    attention output's (∇ ⊙ value)⁺ per token (for a CLS-only head: the CLS row)."""
    model = FAMILIES[which]()
    x, target = torch.randn(1, 3, SIDE, SIDE), 3
    weights, context, logits = captured_by_hand(model, x)
    logits[0, target].backward()
    n = weights[0].shape[-1]
    r = torch.eye(n)
    for a in weights:
        r = r + (a.grad * a).clamp(min=0).mean(1)[0] @ r
    relevance = (context.grad * context)[0].sum(-1)
    if which in ("timm vit", "timm vit_registers", "hf vit"):  # their heads read the CLS token alone
        assert not relevance[1:].any()
    else:  # a distillation token or the patch tokens are read too
        assert relevance[1:].any()
    w = relevance.clamp(min=0)
    expected = w @ r / w.sum() if w.sum() > 0 else r[0]
    got = gae(model, x, target)
    assert got.targets == [target] and got.tokens.shape == (1, n)
    torch.testing.assert_close(got.tokens[0], expected.detach(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("which", list(FAMILIES))
def test_transformer_attribution_on_every_family(which: str) -> None:
    """The blocks re-run as written in visattn.relevance give the model's logits (plain and
    with LRP rules), the relevance reaching the input tokens sums to the logit (1%), and
    the map covers the model's own patch grid (registers and distillation token apart)."""
    model = FAMILIES[which]()
    x = torch.randn(2, 3, SIDE, SIDE)
    spec = _as_transformer(model, (SIDE, SIDE))
    with torch.no_grad():
        logits = model(x)
        for lrp in (False, True):
            torch.testing.assert_close(spec.forward(spec.embed(x), _Ops(lrp))[0], logits, atol=1e-5, rtol=1e-4)
    r = transformer_attribution(model, x)
    assert r.targets == logits.argmax(1).tolist() and unsupported(model, (SIDE, SIDE)) is None
    assert (r.conservation < 0.01).all(), r.conservation
    expected_prefix = {"timm deit_distilled": 2, "timm vit_registers": 5, "hf deit": 2, "hf dinov2_registers": 4,
                       "timm average pool": 0}.get(which, 1)
    assert r.prefix == expected_prefix and r.maps().shape == (2, 4, 4) and (r.maps().sum((1, 2)) > 0).all()


def test_refused_variants_say_why() -> None:
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import ResPostBlock

    cases = {
        "attention-pool head": (tiny_timm("vit", global_pool="map"), "its head pools with 'map'"),
        "gated MLP": (tiny_timm("vit", mlp_layer=SwiGLUPacked), "its MLP is GluMlp"),
        "post-norm blocks": (tiny_timm("vit", block_fn=ResPostBlock), "its blocks are ResPostBlock"),
        "hf swin": (HFClassifier(tiny_hf("swin")).eval(), "SwinForImageClassification is not one of"),
    }
    for case, (model, start) in cases.items():
        why = unsupported(model, (SIDE, SIDE))
        assert why is not None and why.startswith(start), (case, why)
        assert transformer_attribution(model, torch.randn(1, 3, SIDE, SIDE)) is None


@pytest.mark.parametrize("which", ["hybrid_vit", "torchvision", "timm q/k norm, scale norms, LayerScale",
                                   "hf dinov2_registers"])
def test_written_out_lrp_pass_equals_autograd_of_the_modified_gradients(which: str) -> None:
    """``_Block.relprop`` on the plain pass's values equals autograd through the block re-run
    with the LRP rules as modified gradients (``_Ops(lrp=True)``), at the block's input and at
    its attention weights, in float64 (where rounding cannot hide a wrong term)."""
    from tests.foreign_models import tiny_torchvision
    from visattn import create_model

    model = {"hybrid_vit": lambda: create_model("hybrid_vit", embed_dim=32, depth=2, heads=2),
             "torchvision": lambda: lively(tiny_torchvision()),
             "timm q/k norm, scale norms, LayerScale": lambda: lively(tiny_timm(
                 "vit_qknorm", scale_attn_norm=True, scale_mlp_norm=True, init_values=0.5)),
             "hf dinov2_registers": lambda: hf("dinov2_registers")}[which]().double().eval()
    spec = _as_transformer(model, (SIDE, SIDE))
    x = spec.embed(torch.randn(2, 3, SIDE, SIDE, dtype=torch.float64)).detach()
    for block in spec.blocks:
        notes: list = []
        with torch.no_grad():
            out = block.forward(x, _Ops(lrp=False, notes=notes), [])
        g = torch.randn_like(out)
        g_x, g_a = block.relprop(notes[0], g)
        xr, weights = x.clone().requires_grad_(), []
        with torch.enable_grad():
            y = block.forward(xr, _Ops(lrp=True), weights)
            want_x, want_a = torch.autograd.grad(y, [xr, weights[0]], g)
        torch.testing.assert_close(y.detach(), out, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(g_a, want_a, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(g_x, want_x, atol=1e-10, rtol=1e-9)
        assert g_a.abs().max() > 1e-3 and g_x.abs().max() > 1e-3
        x = out
