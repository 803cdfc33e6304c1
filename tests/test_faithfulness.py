"""Tests for visattn.faithfulness: deletion/insertion on a model with a known answer, the
number of forwards, the random floor, cascading randomisation and the method table."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from visattn import faithfulness
from visattn.errors import VisattnError
from visattn.explain import grad_cam
from visattn.faithfulness import (
    deletion_insertion, evaluate_methods, markdown_table, random_map, sanity_check, sanity_flag,
)
from visattn.models import create_model

SIDE = 32
REGION = (slice(4, 16), slice(10, 22))  # rows, cols of the only pixels the model looks at


pytestmark = pytest.mark.usefixtures("one_thread")


class RegionModel(nn.Module):
    """Logits [8 · (mean of region R) - 4, 0]: the class-0 probability depends on R only."""

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(1, 1, SIDE, SIDE)
        mask[..., REGION[0], REGION[1]] = 1.0
        self.register_buffer("mask", mask / mask.sum())
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logit = 8.0 * (x.mean(1, keepdim=True) * self.mask).sum(dim=(1, 2, 3)) - 4.0
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def region_images(n: int) -> torch.Tensor:
    """Bright R on a dark, slightly noisy background."""
    x = 0.1 * torch.rand(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    x[..., REGION[0], REGION[1]] = 1.0
    return x


def indicator(n: int) -> np.ndarray:
    m = np.zeros((n, SIDE, SIDE), np.float32)
    m[:, REGION[0], REGION[1]] = 1.0
    return m


@pytest.mark.parametrize("baseline", ["mean", "blur"])
def test_deletion_and_insertion_rank_the_true_map_first(baseline):
    model, x, n, steps = RegionModel(), region_images(3), 3, 16
    good = indicator(n)
    rand = np.stack([random_map((SIDE, SIDE), seed=i) for i in range(n)])
    score = {
        name: deletion_insertion(model, x, m, [0] * n, steps=steps, baseline=baseline)
        for name, m in {"good": good, "random": rand, "inverse": 1.0 - good}.items()
    }
    dele = {k: r["deletion_auc"] for k, r in score.items()}
    ins = {k: r["insertion_auc"] for k, r in score.items()}
    assert (dele["good"] < dele["random"]).all() and (dele["random"] < dele["inverse"]).all()
    assert (ins["good"] > ins["random"]).all() and (ins["random"] > ins["inverse"]).all()
    r = score["good"]
    assert r["deletion_curve"].shape == r["insertion_curve"].shape == (n, steps + 1)
    assert r["fractions"][0] == 0 and r["fractions"][-1] == 1 and (np.diff(r["fractions"]) > 0).all()
    full, blank = r["deletion_curve"][:, 0], r["deletion_curve"][:, -1]
    np.testing.assert_allclose(r["insertion_curve"][:, -1], full, rtol=1e-5)  # all revealed = the image
    np.testing.assert_allclose(r["insertion_curve"][:, 0], blank, rtol=1e-5)  # nothing = the baseline
    assert (full > 0.9).all() and (blank < full - 0.2).all()
    assert ((0 <= r["deletion_auc"]) & (r["deletion_auc"] <= 1)).all()


def test_forwards_are_batched():
    model, n, steps, batch = RegionModel(), 5, 16, 32
    r = deletion_insertion(model, region_images(n), torch.as_tensor(indicator(n)), torch.zeros(n, dtype=torch.long),
                           steps=steps, batch_size=batch)
    assert model.calls <= math.ceil(n * (steps + 1) * 2 / batch) + 2
    assert r["deletion_auc"].shape == (n,)


def test_random_map_is_seeded():
    a, b = random_map((8, 8), seed=1), random_map((8, 8), seed=2)
    assert a.dtype == np.float32 and a.shape == (8, 8) and ((0 <= a) & (a < 1)).all()
    np.testing.assert_array_equal(a, random_map((8, 8), seed=1))
    assert not np.array_equal(a, b)


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return create_model("sa_cnn", widths=(8, 16, 16), heads=2).eval()


def test_grad_cam_decorrelates_under_randomisation(tiny):
    x = torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    corr = sanity_check(tiny, x, 2, lambda m: grad_cam(m, x, 2).map)
    assert len(corr) > 5 and corr[0][0] == "head.fc"  # from the output down
    assert all(-1 <= rho <= 1 for _, rho in corr)
    assert corr[-1][1] < 0.9 and not sanity_flag(corr, threshold=0.9)
    for k, v in tiny.state_dict().items():  # the original is untouched
        torch.testing.assert_close(v, before[k])
    named = sanity_check(tiny, x, None, "grad_cam", layers=["head.fc", "stages.2"])  # a whole stage
    assert [name for name, _ in named] == ["head.fc", "stages.2"] and named[1][1] < 0.9


def test_constant_method_is_flagged(tiny):
    fixed = random_map((SIDE, SIDE), seed=7)
    corr = sanity_check(tiny, torch.rand(1, 3, SIDE, SIDE), 0, lambda m: fixed)
    assert all(rho == 1.0 for _, rho in corr)
    assert sanity_flag(corr) and not sanity_flag([]) and not sanity_flag([("head", 0.1)])


def test_evaluate_methods_and_table():
    model, x = RegionModel(), region_images(2)
    results = evaluate_methods(model, x, [0, 0], methods=("attention", "saliency", "random"), steps=8)
    assert set(results) == {"saliency", "random"}  # no attention site: left out
    assert results["saliency"]["deletion_auc"] < results["random"]["deletion_auc"]
    assert results["saliency"]["insertion_auc"] > results["random"]["insertion_auc"]
    assert results["saliency"]["seconds_per_image"] > 0
    table = markdown_table(results)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| saliency |") and "deletion AUC" in lines[0]
    both = evaluate_methods(model, x, [0, 0], methods=("saliency", "random"), steps=8, baselines=("blur", "mean"))
    assert both["saliency"]["deletion_auc"] == both["saliency"]["baselines"]["blur"]["deletion_auc"]
    for b in ("blur", "mean"):  # the region model: saliency beats random under either baseline
        s, r = both["saliency"]["baselines"][b], both["random"]["baselines"][b]
        assert s["deletion_auc"] < r["deletion_auc"] and s["insertion_auc"] > r["insertion_auc"]
    header = markdown_table(both).splitlines()[0]
    assert header.count("(blur)") == 2 and header.count("(mean)") == 2


def test_road_and_perturbation_beside_deletion_insertion():
    """The same maps go to every protocol: the scores equal direct calls of visattn.perturbation
    on the saliency and random maps, and saliency beats random on the region model."""
    from visattn.perturbation import positive_negative, road

    model, x = RegionModel(), region_images(2)
    fill = [-1.0, -1.0, -1.0]
    r = evaluate_methods(model, x, [0, 0], methods=("saliency", "random"), steps=4,
                         protocols=("deletion_insertion", "road", "perturbation"), fill=fill)
    rand = np.stack([random_map((SIDE, SIDE), seed=i) for i in range(2)])
    want = {**{k: float(v.mean()) for k, v in road(model, x, rand, [0, 0]).items() if k.startswith("road")},
            **{k: float(v) for k, v in positive_negative(model, x, rand, [0, 0], fill=fill).items() if k.endswith("auc")}}
    assert {k: r["random"][k] for k in want} == pytest.approx(want)
    s = r["saliency"]
    assert s["road_morf"] < r["random"]["road_morf"] and s["road_combined"] > r["random"]["road_combined"]
    assert s["positive_auc"] < r["random"]["positive_auc"]
    assert "ROAD MoRF" in markdown_table(r).splitlines()[0] and "positive AUC" in markdown_table(r).splitlines()[0]
    with pytest.raises(VisattnError, match="protocols"):
        evaluate_methods(model, x, [0, 0], methods=("random",), protocols=("road",))


def test_attention_is_scored_per_layer():
    """A model with several attention layers gets one row per layer, each from its own
    site's weights (so the maps differ), plus rollout."""
    torch.manual_seed(0)
    model = create_model("hybrid_vit", depth=2).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    from visattn.explain import attention_layers, attention_map

    layers = attention_layers(model, x[:1])
    assert len(layers) == 2
    first, last = (attention_map(model, x[:1], 0, layer=name).map for name in layers)
    assert not np.allclose(first, last)
    np.testing.assert_array_equal(last, attention_map(model, x[:1], 0).map)  # default: the last layer
    results = evaluate_methods(model, x, [0, 1], methods=("attention", "rollout", "random"), steps=4)
    assert set(results) == {f"attention ({name})" for name in layers} | {"rollout", "random"}
    with pytest.raises(VisattnError, match="no attention layer"):
        attention_map(model, x[:1], 0, layer="nope")



def test_sanity_check_refuses_what_does_not_apply():
    seed = create_model("seed_cnn").eval()
    with pytest.raises(VisattnError, match="does not apply"):
        sanity_check(seed, torch.rand(1, 3, SIDE, SIDE), 0, "attention")
    with pytest.raises(VisattnError, match="unknown method"):
        sanity_check(seed, torch.rand(1, 3, SIDE, SIDE), 0, "nope")
