"""Breaking attention on purpose (visattn.breaking, visattn.positions): each break checked
against a hand recomputation from the captured Q and K, or against a deep copy of the model
changed by hand (Q weights scaled, position tables zeroed); the shared model unchanged, and
two threads breaking one model differently do not mix."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import Tensor, nn

from tests.foreign_models import SIDE, tiny_hf, tiny_timm, tiny_torchvision
from visattn import capture, create_model
from visattn.ablation import AblationError, ablate
from visattn.breaking import BreakError, broken
from visattn.positions import PositionsError, position_encodings

OWN = {  # small visattn models, one per way of making positions and similarities
    "hybrid_vit": ("hybrid_vit", {"embed_dim": 32, "depth": 2, "heads": 2}),
    "sa_cnn_relative": ("sa_cnn", {"widths": (8, 16, 16), "heads": 2, "attn_stages": (0, 1),
                                   "pos_encoding": "relative", "gate_init": 1.0}),
    "sa_cnn_learned": ("sa_cnn", {"widths": (8, 16, 16), "heads": 2, "attn_stages": (1,),
                                  "pos_encoding": "learned", "gate_init": 1.0}),
    "sa_cnn_sinusoidal": ("sa_cnn", {"widths": (8, 16, 16), "heads": 2, "attn_stages": (1,),
                                     "pos_encoding": "sinusoidal", "gate_init": 1.0}),
    "sa_cnn_cosine": ("sa_cnn", {"widths": (8, 16, 16), "heads": 2, "attn_stages": (1,),
                                 "similarity": "cosine", "temperature_init": 2.0, "gate_init": 1.0}),
}


def build(family: str) -> nn.Module:
    """A tiny model of ``family`` (random weights, eval mode)."""
    if family in OWN:
        name, cfg = OWN[family]
        model = create_model(name, **cfg).eval()
        for m in model.modules():  # relative tables start at zero: give them something to switch off
            if type(m).__name__ == "RelativeBias":
                nn.init.normal_(m.table)
        return model
    if family == "timm_unfused":
        model = tiny_timm("vit")
        for blk in model.blocks:
            blk.attn.fused_attn = False
        return model
    if family == "hf_eager":
        model = tiny_hf("vit")
        model.set_attn_implementation("eager")
        return model
    if family.startswith("timm_"):
        return tiny_timm(family[5:])
    if family.startswith("hf_"):
        return tiny_hf(family[3:])
    if family == "torchvision":
        return tiny_torchvision()
    raise KeyError(family)


def logits_of(out) -> Tensor:
    return getattr(out, "logits", out)


def queries_scaled(model: nn.Module, factor: float) -> nn.Module:
    """A deep copy whose every query projection is multiplied by ``factor`` (so Q Kᵀ is):
    an independent way to scale a dot-product layer's logits."""
    model, scaled = copy.deepcopy(model), 0
    with torch.no_grad():
        for m in model.modules():
            hf = getattr(m, "query", None) or getattr(m, "q_proj", None)
            scaled += 1
            if isinstance(m, nn.MultiheadAttention):
                e = m.embed_dim
                m.in_proj_weight[:e] *= factor
                m.in_proj_bias[:e] *= factor
            elif isinstance(getattr(m, "qkv", None), nn.Linear):  # timm and visattn tokens: q, k, v rows
                e = m.qkv.out_features // 3
                m.qkv.weight[:e] *= factor
                if m.qkv.bias is not None:
                    m.qkv.bias[:e] *= factor
            elif isinstance(hf, nn.Linear):  # Hugging Face
                hf.weight *= factor
                hf.bias *= factor
            elif isinstance(getattr(m, "q", None), nn.Conv2d):  # sa_cnn
                m.q.weight *= factor
            else:
                scaled -= 1
    assert scaled, "no query projection found"
    return model


def positions_zeroed(model: nn.Module) -> nn.Module:
    """A deep copy with every position table zeroed and every sinusoidal code removed."""
    model = copy.deepcopy(model)
    named = dict([*model.named_parameters(), *model.named_buffers()])
    with torch.no_grad():
        for p in position_encodings(model):
            if p.kind == "sinusoidal":
                model.get_submodule(p.name).pos_encoding = "none"
            else:
                named[p.name].zero_()
    return model


def first_site(trace):
    return next(iter(trace.attention.values()))


SCALED = ("hybrid_vit", "sa_cnn_relative", "sa_cnn_cosine", "timm_vit", "timm_unfused", "hf_vit", "hf_eager",
          "torchvision")


@pytest.mark.parametrize("family", SCALED)
def test_scale_equals_softmax_of_scaled_logits_from_captured_q_and_k(family: str) -> None:
    """×k on the logits: the first layer's weights are softmax(k · scale · QKᵀ + bias) from the
    captured Q and K; no √d: softmax(k · QKᵀ + bias); the logits equal the model whose query
    projections are scaled by k (or √d_k · k) by hand (a cosine layer: its temperature ×k)."""
    model, x = build(family), torch.rand(2, 3, SIDE, SIDE)
    plain = first_site(capture(model, x))
    for factor, sqrt_d in ((3.0, True), (0.2, True), (0.5, False)):
        trace = broken(model, x, scale=factor, sqrt_d=sqrt_d)
        site = first_site(trace)
        torch.testing.assert_close(site.q, plain.q)  # the first layer's inputs are not broken
        q, k = site.q.float(), site.k.float()
        if site.similarity == "cosine":
            q, k = nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)
        base = plain.scale if sqrt_d or site.similarity == "cosine" else 1.0
        logits = (q @ k.transpose(-2, -1)) * base * factor
        if plain.bias is not None:
            logits = logits + plain.bias
        torch.testing.assert_close(site.full_weights(0), logits[0].softmax(-1), atol=1e-6, rtol=1e-5)
        if site.similarity == "cosine":
            continue
        ref = queries_scaled(model, factor * base / plain.scale)  # the copy keeps its scale: Q carries it
        with torch.no_grad():
            expected = logits_of(ref(x))
        torch.testing.assert_close(trace.logits, expected, atol=2e-5, rtol=1e-4)


def test_cosine_scale_equals_the_temperature_changed_by_hand() -> None:
    model, x = build("sa_cnn_cosine"), torch.rand(2, 3, SIDE, SIDE)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if hasattr(m, "log_temperature"):
                m.log_temperature += torch.log(torch.tensor(1.5))
        expected = ref(x)
    torch.testing.assert_close(broken(model, x, scale=1.5).logits, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(broken(model, x, scale=1.5, sqrt_d=False).logits, expected, atol=1e-6, rtol=1e-5)


POSITIONED = ("hybrid_vit", "sa_cnn_relative", "sa_cnn_learned", "sa_cnn_sinusoidal", "timm_vit", "timm_vit_registers",
              "hf_vit", "hf_dinov2_registers", "torchvision")


@pytest.mark.parametrize("family", POSITIONED)
def test_positions_off_equals_the_tables_zeroed_on_a_copy(family: str) -> None:
    model, x = build(family), torch.rand(2, 3, SIDE, SIDE)
    found = position_encodings(model)
    assert found and all(p.switchable for p in found), found
    off = broken(model, x, positions=False)
    expected = capture(positions_zeroed(model), x)
    assert torch.equal(off.logits, expected.logits)
    assert not torch.equal(off.logits, capture(model, x).logits)  # the positions mattered
    for name, site in expected.attention.items():
        torch.testing.assert_close(off.attention[name].full_weights(1), site.full_weights(1), atol=0, rtol=0)


def test_a_model_without_positions_says_so() -> None:
    x = torch.rand(1, 3, SIDE, SIDE)
    for model in (create_model("sa_cnn", widths=(8, 16, 16), heads=2, pos_encoding="none").eval(),
                  create_model("cbam_cnn", stem_width=8, widths=(8, 16, 16)).eval()):
        assert position_encodings(model) == []
        with pytest.raises(PositionsError, match="no position table or sinusoidal code") as e:
            broken(model, x, positions=False)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("family", ("hybrid_vit", "sa_cnn_relative", "timm_vit", "hf_vit"))
def test_nothing_broken_is_the_plain_capture_and_heads_are_ablate(family: str) -> None:
    model, x = build(family), torch.rand(2, 3, SIDE, SIDE)
    plain, same = capture(model, x), broken(model, x)
    assert torch.equal(same.logits, plain.logits)
    with torch.no_grad():
        torch.testing.assert_close(same.logits, logits_of(model(x)), atol=1e-6, rtol=1e-5)
    for name, site in plain.attention.items():
        assert torch.equal(same.attention[name].full_weights(0), site.full_weights(0))
    last = list(plain.attention)[-1]
    removed = broken(model, x, heads={last: [1]})
    torch.testing.assert_close(removed.logits, logits_of(ablate(model, x, {last: [1]})), atol=1e-6, rtol=1e-5)
    assert not torch.equal(removed.logits, plain.logits)


@pytest.mark.parametrize("fused, unfused", [("timm_vit", "timm_unfused"), ("hf_vit", "hf_eager")])
def test_heads_removed_in_the_model_s_own_softmax_path_equal_the_fused_path(fused: str, unfused: str) -> None:
    """timm's unfused and Hugging Face's eager attention compute weights @ V themselves: the
    edit reaches that product (ablate and broken), as on the fused path, which test_ablation
    checks against zeroed channels at the output projection."""
    torch.manual_seed(0)
    model = build(fused)
    torch.manual_seed(0)
    other, x = build(unfused), torch.rand(2, 3, SIDE, SIDE)
    other.load_state_dict(model.state_dict())
    heads = {name: [1] for name in capture(model, x).attention}
    torch.testing.assert_close(logits_of(ablate(other, x, heads)), logits_of(ablate(model, x, heads)),
                               atol=1e-5, rtol=1e-5)
    # in bfloat16, transformers' eager path softmaxes in float32 and casts: the cast copy is edited
    half, other_half, xh = copy.deepcopy(model).bfloat16(), copy.deepcopy(other).bfloat16(), x.bfloat16()
    removed = logits_of(ablate(other_half, xh, heads)).float()
    torch.testing.assert_close(removed, logits_of(ablate(half, xh, heads)).float(), atol=2e-3, rtol=0)
    assert (removed - logits_of(other_half(xh)).float()).abs().max() > 0.02
    both = dict(scale=0.5, positions=False, heads=heads)
    torch.testing.assert_close(broken(other, x, **both).logits, broken(model, x, **both).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(broken(other, x, **both).logits, broken(other, x, scale=0.5, positions=False).logits)


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ("hybrid_vit", "sa_cnn_sinusoidal", "timm_unfused", "hf_vit"))
def test_the_shared_model_is_unchanged(family: str) -> None:
    model, x = build(family), torch.rand(1, 3, SIDE, SIDE)
    before, layer = state(model), list(capture(model, x).attention)[0]
    with torch.no_grad():
        plain = logits_of(model(x))
    broken(model, x, scale=4.0, sqrt_d=False, positions=False, heads={layer: [0]})
    after = state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training
    for m in model.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks), m
    with torch.no_grad():
        assert torch.equal(logits_of(model(x)), plain)  # outside the call nothing is broken


def test_two_threads_breaking_one_model_differently_do_not_mix() -> None:
    model, x = build("hybrid_vit"), torch.rand(2, 3, SIDE, SIDE)
    breaks = [dict(scale=5.0, sqrt_d=False), dict(positions=False, heads={"blocks.0.attn": [0, 1]}), {}]
    expected = [broken(model, x, **b).logits for b in breaks]
    got: list[list[Tensor]] = [[] for _ in breaks]
    start = threading.Barrier(len(breaks))

    def work(i: int) -> None:
        start.wait()
        for _ in range(15):
            got[i].append(broken(model, x, **breaks[i]).logits)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(breaks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, runs in enumerate(got):
        assert len(runs) == 15 and all(torch.equal(r, expected[i]) for r in runs), breaks[i]
    assert len({tuple(e[0].tolist()) for e in expected}) == len(breaks)  # three different answers


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "2"])
def test_bad_scale_is_one_line(bad) -> None:
    model = build("hybrid_vit")
    with pytest.raises(BreakError, match="positive number") as e:
        broken(model, torch.rand(1, 3, SIDE, SIDE), scale=bad)
    assert "\n" not in str(e.value)


def test_bad_heads_are_one_line() -> None:
    model, x = build("hybrid_vit"), torch.rand(1, 3, SIDE, SIDE)
    for heads, message in (({"blocks.9.attn": [0]}, "no attention layer"), ({"blocks.0.attn": [7]}, "no head 7")):
        with pytest.raises(AblationError, match=message) as e:
            broken(model, x, heads=heads)
        assert "\n" not in str(e.value)
