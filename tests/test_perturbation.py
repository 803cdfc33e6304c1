"""ROAD imputation and the positive/negative perturbation protocol on models worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from visattn.perturbation import impute, positive_negative, road


def test_imputation_keeps_a_linear_image_and_touches_only_removed_pixels() -> None:
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:12, 0:12].astype(np.float32)
    ramp = np.stack([ys + 2 * xs, 3 - ys, 0.5 * xs])  # linear in y and x: the 8-neighbour mean keeps it
    hole = np.zeros((12, 12), bool)
    hole[1:-1, 1:-1] = rng.random((10, 10)) < 0.6  # interior pixels, many of them neighbours
    np.testing.assert_allclose(impute(ramp, hole), ramp, atol=1e-4)
    img = rng.random((3, 12, 12)).astype(np.float32)
    hole[0, :4] = True  # border pixels too
    out = impute(img, hole)
    assert np.array_equal(out[:, ~hole], img[:, ~hole]) and not np.allclose(out[:, hole], img[:, hole])
    i = np.flatnonzero(hole.ravel())[5]  # every removed pixel is the weighted mean of its neighbours
    y, x = divmod(i, 12)
    near = [(dy, dx, 1 / 6 if dy == 0 or dx == 0 else 1 / 12) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    near = [(y + dy, x + dx, w) for dy, dx, w in near if 0 <= y + dy < 12 and 0 <= x + dx < 12]
    mean = sum(w * out[:, a, b] for a, b, w in near) / sum(w for _, _, w in near)
    np.testing.assert_allclose(out[:, y, x], mean, atol=1e-5)
    noisy = impute(img, hole, noise=0.01, rng=np.random.default_rng(1))
    assert 0.005 < np.std(noisy[:, hole] - out[:, hole]) < 0.02


def test_imputation_equals_the_authors_code_in_grad_cam() -> None:
    road_ref = pytest.importorskip("pytorch_grad_cam.metrics.road")
    rng = np.random.default_rng(2)
    img = rng.random((3, 10, 10)).astype(np.float32)
    hole = rng.random((10, 10)) < 0.4
    ref = road_ref.NoisyLinearImputer(noise=0.0)(torch.from_numpy(img), torch.from_numpy((~hole).astype(np.float32)))
    np.testing.assert_allclose(impute(img, hole), ref.numpy(), atol=1e-5)


class Quadrant(nn.Module):
    """Logit 0 = mean of the top-left 8×8 quadrant (channel mean) of a 16×16 image; logit 1 = 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = x[:, :, :8, :8].mean(dim=(1, 2, 3))
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def _quadrant_case() -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    x = -torch.ones(2, 3, 16, 16)
    x[:, :, :8, :8] = 1.0  # bright quadrant on a dark image: class 0
    good = np.zeros((2, 16, 16), np.float32)
    good[:, :8, :8] = 1.0
    good += np.random.default_rng(0).random(good.shape, dtype=np.float32) * 0.1
    return x, good, -good


def test_road_ranks_the_right_map_first() -> None:
    x, good, bad = _quadrant_case()
    g, b = road(Quadrant(), x, good, [0, 0]), road(Quadrant(), x, bad, [0, 0])
    assert g["morf_curve"].shape == (2, 9) and np.allclose(g["fractions"], np.arange(1, 10) / 10)
    assert (g["road_morf"] < b["road_morf"]).all() and (g["road_lerf"] > b["road_lerf"]).all()
    np.testing.assert_allclose(g["road_combined"], ((g["lerf_curve"] - g["morf_curve"]) / 2).mean(1))
    # LeRF with the right map removes dark pixels only up to 75%: the quadrant is untouched, p = sigmoid(1)
    np.testing.assert_allclose(g["lerf_curve"][:, :7], 1 / (1 + np.exp(-1.0)), atol=1e-6)


def test_positive_negative_by_hand() -> None:
    x, good, bad = _quadrant_case()
    r = positive_negative(Quadrant(), x, good, [0, 0], fill=-1.0)
    # k = round(f·256) pixels blackened; the quadrant holds 64, logit 0 = (64 - 2·k_quadrant) / 64.
    # positive (quadrant first): k_q = 26 at 10% (logit > 0), 51 at 20% (< 0): accuracy 1, 1, 0, 0, ...
    np.testing.assert_array_equal(r["positive_curve"], [1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    # negative (the 192 dark pixels first): k_q = 13 at 80% (> 0), 38 at 90% (< 0)
    np.testing.assert_array_equal(r["negative_curve"], [1, 1, 1, 1, 1, 1, 1, 1, 1, 0])
    assert np.isclose(r["positive_auc"], 0.1 + 0.05) and np.isclose(r["negative_auc"], 0.8 + 0.05)
    flipped = positive_negative(Quadrant(), x, bad, [0, 0], fill=-1.0)
    assert flipped["positive_auc"] > r["positive_auc"] and flipped["negative_auc"] < r["negative_auc"]
