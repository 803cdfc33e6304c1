"""Attention maths (visattn.maps) and figures (visattn.plotting) on tiny sites and models."""
from __future__ import annotations

import dataclasses
import io
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from visattn.maps import (  # noqa: E402
    grid_index, head_entropy, mean_attention_distance, normalise, query_maps, rollout, rollout_map, upsample,
)
from visattn.models import create_model  # noqa: E402
from visattn.sites import AttentionSite  # noqa: E402
from visattn.tracing import capture  # noqa: E402
from visattn.plotting import (  # noqa: E402
    channel_bar_figure, figure_to_png, maps_to_npz, overlay, overlay_grid_figure, similarity_figure,
    topk_bar_figure,
)

E = math.e


def make_site(weights=None, q=None, k=None, grid=(2, 2), prefix=0, similarity="dot", scale=None):
    """An AttentionSite built by hand; q and k default to zeros of the weights' shape."""
    shape = weights.shape[:3] + (4,) if weights is not None else q.shape
    q = torch.zeros(shape) if q is None else q
    k = torch.zeros(shape) if k is None else k
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return AttentionSite(name="hand", q=q, k=k, v=torch.zeros(shape), weights=weights, similarity=similarity,
                         scale=scale, bias=None, grid=grid, prefix=prefix)


def softmax_weights(b, h, n, seed=0):
    return torch.randn(b, h, n, n, generator=torch.Generator().manual_seed(seed)).mul(2).softmax(-1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def sa_trace(images):
    torch.manual_seed(0)
    return capture(create_model("sa_cnn").eval(), images)


@pytest.fixture(scope="module")
def hybrid_trace(images):
    torch.manual_seed(0)
    return capture(create_model("hybrid_vit").eval(), images)


@pytest.fixture(scope="module")
def vit_site():
    torch.manual_seed(0)
    model = create_model("vit_b_16", image_size=64).eval()
    trace = capture(model, torch.randn(1, 3, 64, 64))
    return list(trace.attention.values())[-1]


# --- query_maps on a hand-made 2×2 grid -------------------------------------------------
# One head, d_k = 4 (√d_k = 2). Query token 0 has q = [2, 0, 0, 0]; the keys are
#   k0 = [1, 0, 0, 0]  q·k = 2  |q||k| = 2   cos = 1
#   k1 = [1, 1, 1, 1]  q·k = 2  |q||k| = 4   cos = 0.5
#   k2 = [0, 0, 3, 0]  q·k = 0               cos = 0
#   k3 = [0, 0, 0, 1]  q·k = 0               cos = 0
# Textbook softmax(q·k/2) = softmax([1, 1, 0, 0]) = [e, e, 1, 1] / (2e + 2)
#                         ≈ [0.3655, 0.3655, 0.1345, 0.1345].
# The layer itself is a cosine layer with temperature 2·ln 3: logits = [2 ln 3, ln 3, 0, 0],
# exp = [9, 3, 1, 1], so its attention is [9, 3, 1, 1] / 14 — not the textbook softmax.
HAND_Q = torch.tensor([[2.0, 0, 0, 0]] * 4).reshape(1, 1, 4, 4)
HAND_K = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 3, 0], [0, 0, 0, 1]]).reshape(1, 1, 4, 4)
HAND_ATTENTION = np.array([[9, 3], [1, 1]]) / 14


@pytest.mark.parametrize("kept", [False, True])
def test_query_maps_hand_values(kept):
    site = make_site(q=HAND_Q, k=HAND_K, similarity="cosine", scale=2 * math.log(3))
    if kept:
        site = dataclasses.replace(site, weights=site.full_weights(0)[None])
    maps = query_maps(site, 0, 0)
    assert {k: v.shape for k, v in maps.items()} == {
        "attention": (1, 2, 2), "dot": (1, 2, 2), "cosine": (1, 2, 2), "softmax": (1, 2, 2), "attention_mean": (2, 2),
    }
    np.testing.assert_allclose(maps["dot"][0], [[2, 2], [0, 0]], atol=1e-6)
    np.testing.assert_allclose(maps["cosine"][0], [[1, 0.5], [0, 0]], atol=1e-6)
    np.testing.assert_allclose(maps["softmax"][0], np.array([[E, E], [1, 1]]) / (2 * E + 2), atol=1e-6)
    np.testing.assert_allclose(maps["attention"][0], HAND_ATTENTION, atol=1e-6)
    np.testing.assert_allclose(maps["attention_mean"], HAND_ATTENTION, atol=1e-6)


def test_query_maps_drop_prefix_columns(vit_site):
    maps = query_maps(vit_site, 0, 0)  # the CLS query
    assert maps["attention"].shape == (12, 4, 4)
    expected = vit_site.weights[0, :, 0, 1:].reshape(12, 4, 4).numpy()
    np.testing.assert_allclose(maps["attention"], expected, atol=1e-6)
    assert np.all(maps["attention"].sum((1, 2)) < 1)  # the CLS column is gone
    with pytest.raises(IndexError):
        query_maps(vit_site, 0, 17)


@pytest.mark.parametrize("cfg", [{}, {"similarity": "cosine", "pos_encoding": "relative"}])
def test_on_demand_rows_equal_stored(images, cfg):
    torch.manual_seed(0)
    site = capture(create_model("sa_cnn", **cfg).eval(), images).attention["stages.1.1"]
    assert site.weights is not None and site.grid == (8, 8)
    lazy = dataclasses.replace(site, weights=None)
    for b, query in [(0, 0), (1, 27), (1, 63)]:
        stored, computed = query_maps(site, b, query), query_maps(lazy, b, query)
        for name in stored:
            np.testing.assert_allclose(computed[name], stored[name], atol=1e-5)
    np.testing.assert_allclose(head_entropy(lazy), head_entropy(site), atol=1e-4)
    np.testing.assert_allclose(mean_attention_distance(lazy, 1), mean_attention_distance(site, 1), atol=1e-4)
    np.testing.assert_allclose(rollout([lazy], 1), rollout([site], 1), atol=1e-5)


def test_on_demand_rows_without_vmap(sa_trace, monkeypatch):
    """A row() that vmap cannot batch still works, one query at a time."""
    site = sa_trace.attention["stages.1.1"]

    def no_vmap(*args, **kwargs):
        raise NotImplementedError("no batching rule")

    monkeypatch.setattr(torch.func, "vmap", no_vmap)
    lazy = dataclasses.replace(site, weights=None)
    np.testing.assert_allclose(head_entropy(lazy, 0), head_entropy(site, 0), atol=1e-4)


# --- rollout ------------------------------------------------------------------------------
def test_rollout_one_layer_without_residual_is_head_mean():
    w = softmax_weights(2, 3, 5)
    joint = rollout([make_site(w, grid=(2, 2), prefix=1)], b=1, add_residual=False)
    np.testing.assert_allclose(joint, w[1].mean(0).numpy(), atol=1e-6)


def test_rollout_of_identity_is_identity():
    eye = torch.eye(5).expand(1, 3, 5, 5).clone()
    sites = [make_site(eye, grid=(2, 2), prefix=1) for _ in range(3)]
    for fusion in ("mean", "max", "min"):
        np.testing.assert_allclose(rollout(sites, head_fusion=fusion), np.eye(5), atol=1e-6)


def test_rollout_rows_sum_to_one_and_fusions_differ(hybrid_trace):
    joint = rollout(hybrid_trace, b=1, discard_ratio=0.5)
    assert joint.shape == (64, 64)
    np.testing.assert_allclose(joint.sum(-1), 1.0, atol=1e-5)
    sites = [make_site(softmax_weights(1, 4, 5, seed=s), prefix=1) for s in range(3)]
    by_fusion = {f: rollout(sites, head_fusion=f) for f in ("mean", "max", "min")}
    for f, joint in by_fusion.items():
        np.testing.assert_allclose(joint.sum(-1), 1.0, atol=1e-5, err_msg=f)
    assert not np.allclose(by_fusion["max"], by_fusion["mean"], atol=1e-3)
    assert not np.allclose(by_fusion["min"], by_fusion["mean"], atol=1e-3)


def test_rollout_uses_the_deepest_run_of_equal_token_counts():
    shallow = make_site(softmax_weights(1, 2, 17, seed=1), grid=(4, 4), prefix=1)
    deep = [make_site(softmax_weights(1, 2, 5, seed=s)) for s in (2, 3)]
    deep = [dataclasses.replace(s, prefix=1) for s in deep]
    np.testing.assert_allclose(rollout([shallow, *deep]), rollout(deep), atol=1e-6)
    a1, a2 = (0.5 * s.weights[0].mean(0) + 0.5 * torch.eye(5) for s in deep)
    np.testing.assert_allclose(rollout(deep), (a2 @ a1).numpy(), atol=1e-6)  # deepest on the left
    m = rollout_map(deep)
    np.testing.assert_allclose(m, normalise(rollout(deep)[0, 1:].reshape(2, 2)), atol=1e-6)  # the CLS row


def test_rollout_map_without_prefix_is_column_mean(hybrid_trace):
    m = rollout_map(hybrid_trace, b=0)
    assert m.shape == (8, 8) and m.min() == 0.0 and m.max() == 1.0
    np.testing.assert_allclose(m, normalise(rollout(hybrid_trace).mean(0).reshape(8, 8)), atol=1e-5)


# --- head statistics -----------------------------------------------------------------------
def test_head_entropy_uniform_and_one_hot():
    uniform = make_site(torch.full((2, 3, 5, 5), 1 / 5), prefix=1)
    np.testing.assert_allclose(head_entropy(uniform), [math.log(5)] * 3, atol=1e-6)
    one_hot = torch.eye(5)[torch.tensor([2, 0, 4, 1, 3])].expand(1, 3, 5, 5).clone()
    np.testing.assert_allclose(head_entropy(make_site(one_hot, prefix=1), b=0), [0.0] * 3, atol=1e-7)


def test_mean_attention_distance_self_and_uniform():
    self_only = make_site(torch.eye(4).expand(1, 2, 4, 4).clone())
    np.testing.assert_allclose(mean_attention_distance(self_only), [0.0, 0.0], atol=1e-7)
    # Uniform over a 2×2 grid: from any cell the keys lie at 0, 1, 1 and √2 cells.
    hand = (0 + 1 + 1 + math.sqrt(2)) / 4
    uniform = make_site(torch.full((1, 2, 4, 4), 0.25))
    np.testing.assert_allclose(mean_attention_distance(uniform), [hand, hand], atol=1e-6)
    np.testing.assert_allclose(mean_attention_distance(uniform, cell_size=16.0), [16 * hand] * 2, atol=1e-5)
    with_cls = make_site(torch.full((1, 2, 5, 5), 0.2), prefix=1)  # CLS query and key left out
    np.testing.assert_allclose(mean_attention_distance(with_cls, b=0), [hand, hand], atol=1e-6)


# --- grid_index, upsample, normalise ---------------------------------------------------------
def test_grid_index_corners(vit_site, sa_trace):
    assert vit_site.grid == (4, 4) and vit_site.prefix == 1
    corners = [(0.0, 0.0), (0.0, 0.99), (0.99, 0.0), (0.99, 0.99), (1.0, 1.0), (0.5, 0.5)]
    assert [grid_index(vit_site, y, x) for y, x in corners] == [1, 4, 13, 16, 16, 11]
    sa = sa_trace.attention["stages.1.1"]
    assert [grid_index(sa, y, x) for y, x in corners] == [0, 7, 56, 63, 63, 36]
    with pytest.raises(ValueError):
        grid_index(sa, -0.1, 0.5)


def test_upsample_and_normalise():
    up = upsample(np.array([[0.0, 1.0], [2.0, 3.0]]), (4, 6))
    assert up.shape == (4, 6) and up.dtype == np.float32
    assert up[0, 0] == 0.0 and up[-1, -1] == 3.0  # align_corners=False keeps the corner values
    np.testing.assert_allclose(normalise(np.array([2.0, 4.0, 3.0])), [0.0, 1.0, 0.5])
    np.testing.assert_array_equal(normalise(np.full((3, 3), 7.0)), np.zeros((3, 3)))


# --- plotting ----------------------------------------------------------------------------------
IMAGE = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_overlay_shape_dtype_and_blend():
    m = np.arange(16.0).reshape(4, 4)
    out = overlay(IMAGE, m, alpha=0.5)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(overlay(IMAGE, m, alpha=0.0), IMAGE)
    pure = overlay(IMAGE, m, alpha=1.0, cmap="gray")
    assert pure[0, 0].tolist() == [0, 0, 0] and pure[-1, -1].tolist() == [255, 255, 255]


@pytest.mark.parametrize("which", ["sa", "hybrid"])
def test_figures_build(which, sa_trace, hybrid_trace):
    trace = sa_trace if which == "sa" else hybrid_trace
    query = grid_index(next(iter(trace.attention.values())), 0.4, 0.6)
    per_layer = {name: query_maps(site, 0, query) for name, site in trace.attention.items()}
    fig = overlay_grid_figure(IMAGE, {n: m["attention"] for n, m in per_layer.items()}, query_yx=(0.4, 0.6))
    heads = next(iter(trace.attention.values())).heads
    assert len([ax for ax in fig.axes if ax.images]) == len(per_layer) * (heads + 1)
    assert fig.axes[-1].get_ylabel() == "attention weight"  # the one shared colour bar
    if which == "sa":  # rendering is the slow part: once is enough
        assert figure_to_png(fig, dpi=40).startswith(b"\x89PNG")
    sim = similarity_figure(IMAGE, {k: v[0] for k, v in per_layer[next(iter(per_layer))].items()}, (0.4, 0.6))
    heatmaps = [t for t in sim.data if isinstance(t, go.Heatmap)]
    assert [h.name for h in heatmaps] == ["attention", "dot", "cosine", "softmax"]
    assert [h.colorbar.title.text for h in heatmaps] == ["attention weight", "q·k (raw)", "cos(q, k)",
                                                        "softmax(q·k/√d_k)"]
    assert sum(isinstance(t, go.Scatter) for t in sim.data) == 5  # query marked in every panel
    assert sim.layout.yaxis2.range == (32, 0)  # image-like: y grows downwards


def test_bar_figures_and_exports():
    fig = channel_bar_figure(np.linspace(0.1, 0.9, 16), "stages.0.se")
    assert fig.data[0].type == "bar" and len(fig.data[0].y) == 16
    top = topk_bar_figure(["cat", "dog", "car", "cat"], np.array([0.2, 0.5, 0.1, 0.2]), k=3)
    assert top.data[0].orientation == "h" and top.data[0].text == ("50.0%", "20.0%", "20.0%")
    assert top.layout.yaxis.ticktext == ("dog", "cat", "cat")
    arrays = {"stages.1.1": np.random.default_rng(1).random((4, 8, 8)).astype(np.float32), "mean": np.eye(3)}
    loaded = np.load(io.BytesIO(maps_to_npz(arrays)))
    assert sorted(loaded.files) == sorted(arrays)
    for name, a in arrays.items():
        np.testing.assert_array_equal(loaded[name], a)


# ----------------------------------------------------------------------------- raster panels (visattn.panels)
def test_colourise_matches_the_matplotlib_colormap():
    from visattn.panels import colourise

    m = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    want = matplotlib.colormaps["viridis"]((m - m.min()) / (m.max() - m.min()))[..., :3] * 255
    got = colourise(m, "viridis").astype(np.float64)
    assert np.abs(got - want).max() <= 3.0  # 256-entry table: one step of quantisation at most
    assert colourise(np.full((2, 2), 3.0), "gray").max() == 0  # constant map: the low end, no division by zero
    clipped = colourise(np.array([[-1.0, 0.5, 2.0]]), "gray", vmin=0.0, vmax=1.0)[0, :, 0].tolist()
    assert clipped == [0, 128, 255]


def test_heatmap_panels_draw_each_map_cell_by_cell():
    """Each heatmap's cell centres carry exactly the colour of that cell's value (own scale);
    the brightest cell of the gray panel is the map's argmax."""
    from visattn.panels import colourise, heatmap_panels

    rng = np.random.default_rng(1)
    maps = {"dot": rng.normal(size=(4, 4)), "cosine": rng.uniform(-1, 1, size=(2, 4, 4))}
    labels = {"dot": "q·k (raw)", "cosine": "cos(q, k)"}
    out = heatmap_panels(IMAGE, maps, labels, query_yx=None, cmap="gray", size=64)
    assert out.dtype == np.uint8 and out.shape[1] > 3 * 64
    title_h = out.shape[0] - 64
    # the "dot" panel starts after the image (64 px) and the gap (18 px)
    panel = out[title_h:, 64 + 18: 64 + 18 + 64]
    centres = panel[8::16, 8::16]
    np.testing.assert_array_equal(centres, colourise(maps["dot"], "gray"))
    r, c = np.unravel_index(np.argmax(maps["dot"]), (4, 4))
    assert centres[r, c].tolist() == [255, 255, 255]


def test_overlay_grid_image_has_a_cell_per_head_and_marks_the_query():
    from visattn.panels import CYAN, overlay_grid_image

    maps = {"a": np.random.default_rng(2).random((3, 4, 4)), "b": np.random.default_rng(3).random((3, 2, 2))}
    one = overlay_grid_image(IMAGE, {"a": maps["a"]}, size=64, query_yx=(0.5, 0.5))
    two = overlay_grid_image(IMAGE, maps, size=64, query_yx=(0.5, 0.5))
    assert two.shape[0] > 1.8 * one.shape[0] and two.shape[1] == one.shape[1]
    assert one.shape[1] > 4 * 64  # three heads and their mean
    cyan = np.all(one == CYAN, axis=-1)
    cols = np.flatnonzero(cyan.any(axis=0))
    groups = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1)
    assert len(groups) == 4  # the query cross in each of the four cells
    without = overlay_grid_image(IMAGE, {"a": maps["a"]}, size=64, query_yx=None)
    assert not np.all(without == CYAN, axis=-1).any()
