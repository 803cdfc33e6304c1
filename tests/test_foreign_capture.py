"""Capture of other libraries' attention (timm, Hugging Face, torchvision, any
nn.MultiheadAttention): exact against each library's own reference, logits unchanged,
token layout from the model, and one warning per layer it cannot see."""
from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from tests.foreign_models import HF_FAMILIES, SIDE, TINY_TIMM, MHANet, tiny_hf, tiny_timm, tiny_torchvision
from visattn import capture
from visattn.tracing import CaptureWarning
from visattn.tokens import TokenLayout, token_layout

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(atol=1e-5, rtol=1e-5)


def captured(model: nn.Module, x: torch.Tensor, **kw):
    """capture(), asserting that it warns about nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureWarning)
        return capture(model, x, **kw)


def inputs_of(modules: dict[str, nn.Module], run) -> dict[str, torch.Tensor]:
    """The first positional input of each module during ``run()`` (hooks removed after)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_: nn.Module, args: tuple) -> None:
            seen.setdefault(name, args[0])
        return hook

    handles = [m.register_forward_pre_hook(keep(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


class CountSDPA(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is F.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", list(TINY_TIMM))
def test_timm_equals_a_recompute_from_its_own_qkv(family: str) -> None:
    model = tiny_timm(family)
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        plain = model(x)
    trace = captured(model, x)
    torch.testing.assert_close(trace.logits, plain, **TOL)
    attns = {f"blocks.{i}.attn": b.attn for i, b in enumerate(model.blocks)}
    assert set(trace.attention) == set(attns)
    for name, x_in in inputs_of(attns, lambda: model(x)).items():
        a = attns[name]
        b, n, c = x_in.shape
        q, k, _ = a.qkv(x_in).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        expected = ((a.q_norm(q) @ a.k_norm(k).transpose(-2, -1)) * a.scale).softmax(-1)
        torch.testing.assert_close(trace.attention[name].weights, expected, **TOL)


@pytest.mark.parametrize("family", ["vit", "vit_qknorm", "deit_distilled"])
def test_timm_equals_its_unfused_path_and_captures_it(family: str) -> None:
    """timm's own unfused attention (``fused_attn=False``) gives the reference weights (read
    where they enter ``attn_drop``); capture on that model reads them too."""
    fused = tiny_timm(family)
    unfused = copy.deepcopy(fused)
    for blk in unfused.blocks:
        blk.attn.fused_attn = False
    x = torch.randn(2, 3, SIDE, SIDE)
    drops = {f"blocks.{i}.attn": b.attn.attn_drop for i, b in enumerate(unfused.blocks)}
    reference = inputs_of(drops, lambda: unfused(x))
    for model in (fused, unfused):
        trace = captured(model, x)
        for name, w in reference.items():
            torch.testing.assert_close(trace.attention[name].weights, w, **TOL)
            site = trace.attention[name]  # Q, K and the scale reproduce the weights
            torch.testing.assert_close(site.row(1, 3), site.logits(1, 3).softmax(-1), **TOL)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_hugging_face_equals_eager_output_attentions(family: str) -> None:
    model = tiny_hf(family)  # the default attention implementation: SDPA
    assert model.config._attn_implementation == "sdpa"
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        ref = eager(pixel_values=x, output_attentions=True)
    for m in (model, eager):
        trace = captured(m, x)
        torch.testing.assert_close(trace.logits, ref.logits, **TOL)
        assert len(trace.attention) == len(ref.attentions) == 2
        for site, w in zip(trace.attention.values(), ref.attentions):
            torch.testing.assert_close(site.weights, w, **TOL)
            torch.testing.assert_close(site.row(0, 2), site.logits(0, 2).softmax(-1), **TOL)


def test_torchvision_vit_equals_need_weights() -> None:
    model = tiny_torchvision()
    x = torch.randn(2, 3, SIDE, SIDE)
    trace = captured(model, x)
    attns = {n: m for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    for name, t in inputs_of(attns, lambda: model(x)).items():
        with torch.no_grad():
            _, w = attns[name](t, t, t, need_weights=True, average_attn_weights=False)
        torch.testing.assert_close(trace.attention[name].weights, w, **TOL)


@pytest.mark.parametrize("batch_first", [True, False])
def test_any_multihead_attention_equals_need_weights(batch_first: bool) -> None:
    model = MHANet(batch_first).eval()
    x = torch.randn(3, 3, SIDE, 2 * SIDE)
    with torch.no_grad():
        plain = model(x)
        t = model.tokens(x)
        ref_out, ref_w = model.attn(t, t, t, need_weights=True, average_attn_weights=False)
    trace = captured(model, x, layout=TokenLayout((), (4, 8)))
    torch.testing.assert_close(trace.logits, plain, **TOL)
    site = trace.attention["attn"]
    torch.testing.assert_close(site.weights, ref_w, **TOL)
    torch.testing.assert_close(site.context, ref_out if batch_first else ref_out.transpose(0, 1), **TOL)
    assert site.grid == (4, 8) and site.prefix == 0


def test_masked_multihead_attention_equals_need_weights() -> None:
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    t = torch.randn(1, 6, 16)
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[:, 4:] = True  # no query may look at the last two tokens
    padding = torch.tensor([[False, True, False, False, False, False]])

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, attn_mask=mask, key_padding_mask=padding, need_weights=False)[0]

    trace = captured(Net(), t)
    with torch.no_grad():
        _, w = mha(t, t, t, attn_mask=mask, key_padding_mask=padding, average_attn_weights=False)
    torch.testing.assert_close(trace.attention["attn"].weights, w, **TOL)
    assert trace.attention["attn"].weights[..., [1, 4, 5]].abs().max() == 0


@pytest.mark.parametrize("build, prefix, names", [
    (lambda: tiny_timm("vit"), 1, ("CLS",)),
    (lambda: tiny_timm("deit_distilled"), 2, ("CLS", "distillation")),
    (lambda: tiny_timm("vit_registers"), 5, ("CLS", "register 1", "register 2", "register 3", "register 4")),
    (lambda: tiny_hf("vit"), 1, ("CLS",)),
    (lambda: tiny_hf("deit"), 2, ("CLS", "distillation")),
    (lambda: tiny_hf("dinov2_registers"), 4, ("CLS", "register 1", "register 2", "register 3")),
    (tiny_torchvision, 1, ("CLS",)),
])
def test_token_layout_comes_from_the_model(build, prefix: int, names: tuple[str, ...]) -> None:
    model = build()
    assert token_layout(model, (SIDE, SIDE)) == TokenLayout(names, (4, 4))
    for site in captured(model, torch.randn(1, 3, SIDE, SIDE)).attention.values():
        assert (site.prefix, site.grid) == (prefix, (4, 4)) and site.q.shape[2] == prefix + 16


def test_non_square_input_has_a_non_square_grid() -> None:
    model = tiny_timm("vit_registers", dynamic_img_size=True)
    trace = captured(model, torch.randn(1, 3, 24, 48))
    assert {(s.prefix, s.grid) for s in trace.attention.values()} == {(5, (3, 6))}


def warnings_of(model: nn.Module, x: torch.Tensor):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = capture(model, x)
    return trace, [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]


@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_swin_is_refused_per_layer_in_one_line(library: str) -> None:
    if library == "timm":
        import timm

        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=SIDE, patch_size=2,
                                  embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, num_classes=5).eval()
    else:
        model = tiny_hf("swin")
    x = torch.randn(1, 3, SIDE, SIDE)
    with torch.no_grad():
        plain = model(x)
    trace, messages = warnings_of(model, x)
    layers = [n for n, m in model.named_modules() if type(m).__name__ in ("WindowAttention", "SwinAttention")]
    assert len(layers) == 2 and not trace.attention
    assert messages == [f"not captured: {', '.join(layers)} (windowed attention: Swin windows are not placed on the "
                        "image)"]  # one warning, one line, every windowed layer named
    assert set(trace.skipped) == set(layers)
    torch.testing.assert_close(getattr(trace.logits, "logits", trace.logits), getattr(plain, "logits", plain), **TOL)


class HandRolledAttention(nn.Module):
    """Attention computed with ops capture does not watch (exp and a sum, no softmax call)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        e = torch.exp(q @ k.transpose(-2, -1) / 4.0)
        return (e / e.sum(-1, keepdim=True)) @ v


def test_a_layer_capture_cannot_see_is_named_once() -> None:
    blocks = nn.ModuleDict({"mine": HandRolledAttention(), "torch": nn.MultiheadAttention(16, 2, batch_first=True)})

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = blocks

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.blocks["mine"](x)
            return self.blocks["torch"](x, x, x, need_weights=False)[0]

    trace, messages = warnings_of(Net().eval(), torch.randn(1, 5, 16))
    assert messages == ["not captured: blocks.mine (custom fused kernel)"]
    assert list(trace.attention) == ["blocks.torch"] and trace.skipped == {"blocks.mine": "custom fused kernel"}


def test_nothing_is_left_on_the_model_and_fused_attention_stays_on() -> None:
    model = tiny_timm("vit")
    x = torch.randn(1, 3, SIDE, SIDE)

    def state() -> list:
        return [(type(m), sorted(vars(m)), len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]

    before = state()
    captured(model, x)
    assert state() == before
    with CountSDPA() as count, torch.no_grad():
        model(x)
    assert count.calls == 2  # both blocks still call the fused kernel


def test_threads_capturing_and_running_plainly_do_not_mix() -> None:
    """One thread captures two images in turn while another runs plain forwards on the same
    model: the plain thread's fused calls are not seen, and no map belongs to the wrong image."""
    model = tiny_hf("vit")
    images = [torch.randn(1, 3, SIDE, SIDE), torch.randn(1, 3, SIDE, SIDE) * 2]
    expected = [captured(model, x) for x in images]
    with torch.no_grad():
        plain_ref = model(pixel_values=images[0]).logits
    stop, errors, plain_calls = threading.Event(), [], []

    def plain() -> None:
        with CountSDPA() as count, torch.no_grad():
            while not stop.is_set():
                if not torch.equal(model(pixel_values=images[0]).logits, plain_ref):
                    errors.append("plain logits changed")
        plain_calls.append(count.calls)

    t = threading.Thread(target=plain)
    t.start()
    try:
        for i in range(12):
            trace = captured(model, images[i % 2])
            for name, site in trace.attention.items():
                if not torch.equal(site.weights, expected[i % 2].attention[name].weights):
                    errors.append(f"{name}: weights of the other image")
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
    assert plain_calls[0] > 0 and plain_calls[0] % 2 == 0


@pytest.mark.parametrize("library", ["timm", "transformers", "torch"])
def test_head_ablation_reaches_foreign_attention(library: str) -> None:
    """visattn.ablation edits foreign heads through the same per-thread route: zeroing head 1
    equals zeroing its channels where they enter the output projection (a plain pre-hook)."""
    from visattn.ablation import ablate
    from visattn.sources import HFClassifier

    if library == "timm":
        model, layer, proj = tiny_timm("vit"), "blocks.1.attn", "blocks.1.attn.proj"
    elif library == "transformers":
        model, layer, proj = HFClassifier(tiny_hf("vit")).eval(), "model.vit.layers.1.attention", \
            "model.vit.layers.1.attention.o_proj"
    else:
        model, layer, proj = MHANet().eval(), "attn", None
    x = torch.randn(2, 3, SIDE, SIDE)

    if proj is None:  # nn.MultiheadAttention applies out_proj inside the functional call
        ref_model = copy.deepcopy(model)
        d = 16 // 2
        with torch.no_grad():
            ref_model.attn.out_proj.weight[:, d:] = 0.0  # drops head 1's channels, keeps the bias
        expected = ref_model(x)
    else:
        module = model.get_submodule(proj)
        width = module.in_features // 2
        handle = module.register_forward_pre_hook(
            lambda m, a: (torch.cat([a[0][..., :width], torch.zeros_like(a[0][..., width:])], -1),))
        try:
            with torch.no_grad():
                expected = model(x)
        finally:
            handle.remove()
    got = ablate(model, x, {layer: [1]})
    torch.testing.assert_close(got, expected, **TOL)
    with torch.no_grad():
        assert not torch.allclose(got, model(x), atol=1e-4)
