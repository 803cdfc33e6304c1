"""Every registered model: capture is exact, leaves logits alone, and its rows are distributions."""
from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import small_config
from visattn import AttentionSite, ChannelSite, SpatialSite, capture, create_model, list_models, sites

VARIANTS = [(name, {}) for name in list_models()] + [
    ("sa_cnn", {"similarity": "cosine"}),
    ("sa_cnn", {"pos_encoding": "relative"}),
    ("sa_cnn", {"pos_encoding": "learned", "similarity": "cosine"}),
    ("sa_cnn", {"pos_encoding": "none", "depth": 2}),
    ("sa_cnn", {"attn_stages": (0, 1, 1), "pos_encoding": "relative"}),
    ("sa_cnn", {"stem_stride": 2, "attn_stages": (0,), "pos_encoding": "relative", "heads": 1}),
    ("sa_cnn", {"similarity": "cosine", "temperature_init": 1.0}),
    ("hybrid_vit", {"cls_token": True}),
]


def build(name: str, extra: dict) -> tuple[torch.nn.Module, torch.Tensor]:
    cfg, side = small_config(name)
    model = create_model(name, **{**cfg, **extra}).eval()
    for m in model.modules():  # non-trivial gates and temperatures, so the checks bite
        if hasattr(m, "gate"):
            torch.nn.init.constant_(m.gate, 0.7)
        if hasattr(m, "log_temperature"):
            torch.nn.init.constant_(m.log_temperature, math.log(7.0))
    return model, torch.randn(2, 3, side, side)


def recompute(site: AttentionSite) -> torch.Tensor:
    """softmax(QKᵀ/√d_k + bias), or softmax(τ·cos(Q, K) + bias), from the captured Q and K."""
    q, k = site.q.double(), site.k.double()
    if site.similarity == "cosine":
        q = q / q.norm(dim=-1, keepdim=True)
        k = k / k.norm(dim=-1, keepdim=True)
        scores = q @ k.transpose(-2, -1) * site.scale
    else:
        assert site.scale == pytest.approx(1 / math.sqrt(q.shape[-1]))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if site.bias is not None:
        scores = scores + site.bias.double()
    return scores.softmax(-1)


@pytest.mark.parametrize("name,extra", VARIANTS, ids=[f"{n}{'-' + '-'.join(map(str, e.values())) if e else ''}" for n, e in VARIANTS])
def test_capture_is_exact(name: str, extra: dict) -> None:
    model, x = build(name, extra)
    with torch.no_grad():
        plain = model(x)
    trace = capture(model, x)
    torch.testing.assert_close(trace.logits, plain, atol=1e-5, rtol=1e-5)
    for site in trace.attention.values():
        b, h, n, _ = site.q.shape
        assert site.weights.shape == (b, h, n, n)
        assert n == site.prefix + site.grid[0] * site.grid[1]
        torch.testing.assert_close(site.weights.double(), recompute(site), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(site.weights.sum(-1), torch.ones(b, h, n), atol=1e-5, rtol=0)
        assert (site.weights >= 0).all()
    for site in trace.channel.values():
        assert isinstance(site, ChannelSite) and ((site.weights > 0) & (site.weights < 1)).all()
    for site in trace.spatial.values():
        assert isinstance(site, SpatialSite) and site.map.shape[1] == 1


def test_every_attention_family_is_seen() -> None:
    """The families with attention expose it (an empty trace would pass the test above)."""
    expected = {"sa_cnn": AttentionSite, "hybrid_vit": AttentionSite, "vit_b_16": AttentionSite,
                "cbam_cnn": SpatialSite, "seed_cnn": None}
    for name, kind in expected.items():
        model, x = build(name, {})
        sites = capture(model, x).sites.values()
        assert (kind is None) == (not sites)
        if kind:
            assert any(isinstance(s, kind) for s in sites)
    cbam = capture(*build("cbam_cnn", {}))
    assert len(cbam.channel) == 3 and len(cbam.spatial) == 3


@pytest.mark.parametrize("extra", [{}, {"similarity": "cosine", "pos_encoding": "relative"}])
def test_fused_and_explicit_paths_agree(extra: dict) -> None:
    """The training path (SDPA) and the captured path (explicit weights) give one output,
    also when the over-budget fallback (SDPA plus on-demand rows) is taken."""
    model, x = build("sa_cnn", extra)
    with torch.no_grad():
        plain = model(x)
    explicit = capture(model, x)
    fallback = capture(model, x, budget_bytes=0)
    torch.testing.assert_close(explicit.logits, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fallback.logits, plain, atol=1e-5, rtol=1e-5)
    for name, site in fallback.attention.items():
        assert site.weights is None
        full = explicit.attention[name].weights
        for query in (0, site.q.shape[2] // 2, site.q.shape[2] - 1):
            torch.testing.assert_close(site.row(1, query), full[1, :, query], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(site.full_weights(0), full[0], atol=1e-6, rtol=1e-5)


def test_cpu_bf16_training_takes_the_explicit_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 training on CPU computes attention explicitly (faster there); inference and
    float32 training keep the fused kernel."""
    real, calls = sites.fused_is_faster, []
    monkeypatch.setattr(sites, "fused_is_faster", lambda q: calls.append(real(q)) or real(q))
    model, x = build("sa_cnn", {})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().sum().backward()
        assert calls and not any(calls)
        calls.clear()
        with torch.no_grad():
            model(x)
    model(x).sum().backward()
    assert calls and all(calls)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_explicit_bf16_attention_is_as_accurate_as_the_fused_kernel(similarity: str) -> None:
    """Output and gradients of Q, K, V in bf16, both forms against a float64 reference:
    the explicit form stays at bf16 rounding level, like the fused kernel."""
    torch.manual_seed(0)
    q0, k0, v0 = (torch.randn(8, 4, 64, 32) * 1.5 for _ in range(3))
    upstream = torch.randn(8, 4, 64, 32)
    module = torch.nn.Identity()

    def run(dtype: torch.dtype, fused: bool) -> torch.Tensor:
        q, k, v = (t.to(dtype).requires_grad_() for t in (q0, k0, v0))
        scale = torch.tensor(7.0) if similarity == "cosine" else 32 ** -0.5
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sites, "fused_is_faster", lambda _: fused)
            out = sites.attend(module, q, k, v, similarity=similarity, scale=scale, bias=None, grid=(8, 8))
        (out.double() * upstream).sum().backward()
        return torch.cat([t.double().flatten() for t in (out, q.grad, k.grad, v.grad)])

    reference = run(torch.float64, fused=False)
    errors = {fused: ((run(torch.bfloat16, fused) - reference).norm() / reference.norm()).item() for fused in (True, False)}
    assert errors[False] < 0.02 and errors[False] < 3 * errors[True], errors


def test_torchvision_vit_weights_without_need_weights() -> None:
    """torchvision calls MultiheadAttention with need_weights=False; capture still sees every head."""
    model = create_model("vit_b_16", image_size=32, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    trace = capture(model, x)
    assert len(trace.attention) == 12
    site = trace.attention["encoder.layers.encoder_layer_0.self_attention"]
    assert site.weights.shape == (1, 12, 5, 5) and site.prefix == 1 and site.grid == (2, 2)
    # the captured context equals what the untouched module returns
    mha = torch.nn.MultiheadAttention(768, 12, batch_first=True)
    mha.load_state_dict(model.encoder.layers[0].self_attention.state_dict())
    with torch.no_grad():
        ref, ref_w = mha(site.inputs, site.inputs, site.inputs, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(site.context, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(site.weights, ref_w, atol=1e-6, rtol=1e-5)


def test_residual_gate_is_recorded() -> None:
    model, x = build("sa_cnn", {})
    for site in capture(model, x).attention.values():
        torch.testing.assert_close(site.outputs, site.inputs + site.gate * site.context)
        assert site.gate == pytest.approx(0.7)


def test_model_is_left_uninstrumented() -> None:
    model, x = build("sa_cnn", {})
    capture(model, x)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_attn_stages_repeats_stack_blocks_and_old_configs_keep_their_names() -> None:
    """An entry per block: (0, 1, 1) is one block on the 16×16 grid, two on the 8×8 grid; the
    old one-block config keeps its parameter names (``stages.1.1``), so old checkpoints load."""
    from visattn.models.attention import SpatialSelfAttention2d

    def blocks(**cfg) -> dict[str, tuple[int, int]]:
        with torch.device("meta"):
            model = create_model("sa_cnn", widths=(8, 16, 16), heads=2, **cfg)
        return {n: m.grid for n, m in model.named_modules() if isinstance(m, SpatialSelfAttention2d)}

    assert blocks(attn_stages=(1,)) == {"stages.1.1": (8, 8)}
    assert blocks(attn_stages=(0, 1, 1)) == {"stages.0.1": (16, 16), "stages.1.1": (8, 8), "stages.1.2": (8, 8)}
    assert blocks(attn_stages=(1, 0), depth=2) == {"stages.0.1": (16, 16), "stages.0.2": (16, 16),
                                                   "stages.1.1": (8, 8), "stages.1.2": (8, 8)}


def test_a_stride_2_stem_whitens_the_tiled_patches_and_halves_every_grid() -> None:
    """``stem_stride=2``: the 2×2 patches tile the image (32×32 -> 16×16), the fitted filters
    make them white (identity covariance over the patches they were fitted on, the second
    half the negatives of the first), and each stage's grid is half the stride-1 one."""
    from visattn.models.attention import SpatialSelfAttention2d

    model = create_model("sa_cnn", widths=(8, 16), heads=1, attn_stages=(0,), stem_stride=2)
    images = torch.randn(64, 3, 32, 32) * torch.tensor([1.0, 0.5, 2.0])[:, None, None]
    images[:, 1] += 0.8 * images[:, 0]  # correlated channels
    model.stem.fit(images, eps=0.0)
    with torch.no_grad():
        out = model.stem.conv(images) - model.stem.conv.bias[:, None, None]
    assert out.shape == (64, 24, 16, 16)
    white = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    white = white - white.mean(0)
    torch.testing.assert_close(white.T @ white / len(white), torch.eye(12, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[:, 12:], -out[:, :12])
    grids = {n: m.grid for n, m in model.named_modules() if isinstance(m, SpatialSelfAttention2d)}
    assert grids == {"stages.0.1": (8, 8)} and model(images[:2]).shape == (2, 10)


def test_cosine_temperature_init_sets_how_peaked_fresh_attention_is() -> None:
    """At temperature 1 an untrained cosine layer's rows are almost uniform (the probe's
    entropy within 1% of log N), at the old fixed 10 they are peaked before any training."""
    from visattn.probe import probe

    x = torch.randn(8, 3, 32, 32)
    entropy = {}
    for tau in (1.0, 10.0):
        torch.manual_seed(0)
        model = create_model("sa_cnn", widths=(16, 32), heads=1, attn_stages=(0,), stem_stride=2,
                             similarity="cosine", temperature_init=tau)
        model.stem.fit(x)
        (layer,) = probe(model, x).values()
        entropy[tau], uniform = layer["entropy"], layer["uniform"]
        assert capture(model, x[:1]).attention["stages.0.1"].scale == pytest.approx(tau)
    assert entropy[1.0] > 0.99 * uniform > entropy[10.0], entropy


def test_flagship_recipe_has_three_attention_layers_over_two_grids() -> None:
    """The model `make train-flagship` trains (its --set options, read from the Makefile)."""
    import shlex
    from pathlib import Path

    from visattn.cli import parse_overrides
    from visattn.models.attention import SpatialSelfAttention2d

    line = next(l for l in (Path(__file__).parents[1] / "Makefile").read_text().splitlines() if l.startswith("FLAGSHIP ="))
    words = shlex.split(line.partition("=")[2])
    assert words[:2] == ["--model", "sa_cnn"]
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    with torch.device("meta"):
        model = create_model("sa_cnn", **parse_overrides(sets))
    grids = [m.grid for m in model.modules() if isinstance(m, SpatialSelfAttention2d)]
    assert len(grids) >= 3 and len(set(grids)) >= 2, grids
