"""Two more faithfulness protocols beside deletion/insertion, with their exact definitions.

ROAD (Rong, Leemann, Borisov, Kasneci & Kasneci, ICML 2022, "A Consistent and Efficient
Evaluation Strategy for Attribution Methods"), without retraining:
  for p in 10%, 20%, …, 90%, remove the fraction p of pixels ranked by the map — most
  relevant first (MoRF) or least relevant first (LeRF), ties broken by pixel order — and
  fill them by *noisy linear imputation*: every removed pixel equals the weighted mean of its
  in-image 8 neighbours (weight 1/6 for the 4 direct ones, 1/12 for the diagonals), solved
  jointly as one sparse linear system per image and channel, plus Gaussian noise of standard
  deviation ``noise`` (0.01, as in the authors' code, on the tensor the model sees, i.e. the
  normalised image). Score: the target class's softmax probability, averaged over the nine
  fractions: ``road_morf`` (lower is better), ``road_lerf`` (higher is better),
  ``road_combined`` = mean of (LeRF − MoRF) / 2 (higher is better).

Positive / negative perturbation (Chefer, Gur & Wolf, CVPR 2021, §4, as in their
``pertubation_eval_from_hdf5.py``): for f in 0, 10%, …, 90%, set the fraction f of pixels to
black (0 before normalisation: ``fill`` = −mean/std per channel), most relevant first
(positive) or least relevant first (negative), all channels of a pixel together, and measure
top-1 accuracy against the true labels. AUC = trapezoid rule over f = 0, 0.1, …, 0.9
(the unperturbed point included, not divided by the 0.9 width; ×100 gives the paper's
percent figures): ``positive_auc`` (lower is better), ``negative_auc`` (higher is better).
The map is ranked at input resolution (a token map upsampled bilinearly), as in that code.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import spsolve
from torch import Tensor, nn

from visattn.errors import VisattnError

ROAD_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(1, 10))
PERTURBATION_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(10))
#: (dy, dx, weight) of the 8 neighbours in noisy linear imputation
NEIGHBOURS = ((1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12),
              (0, -1, 1 / 6), (-1, -1, 1 / 12), (1, 0, 1 / 6), (-1, 0, 1 / 6))


def impute(image: np.ndarray, removed: np.ndarray, noise: float = 0.0,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Noisy linear imputation (ROAD): ``image`` (C, H, W) with the ``removed`` (H, W) pixels
    replaced by the solution of x_i = Σ_j w_j x_j / Σ_j w_j over their in-image neighbours j,
    plus N(0, noise²).

    >>> ramp = np.add.outer(np.arange(5.0), 2 * np.arange(5.0))[None]  # linear: kept exactly
    >>> hole = np.zeros((5, 5), bool); hole[1:4, 1:4] = True
    >>> bool(np.allclose(impute(ramp, hole), ramp))
    True
    """
    c, h, w = image.shape
    flat = image.reshape(c, h * w).astype(np.float64)
    idx = np.flatnonzero(removed)
    if idx.size == 0:
        return image.copy()
    var = np.full(h * w, -1)
    var[idx] = np.arange(idx.size)
    ys, xs = np.divmod(idx, w)
    rows, cols, vals = [], [], []
    diag, rhs = np.zeros(idx.size), np.zeros((idx.size, c))
    for dy, dx, weight in NEIGHBOURS:
        y2, x2 = ys + dy, xs + dx
        inside = np.flatnonzero((y2 >= 0) & (y2 < h) & (x2 >= 0) & (x2 < w))
        j = y2[inside] * w + x2[inside]
        diag[inside] += weight
        unknown = var[j] >= 0
        rows.append(inside[unknown])
        cols.append(var[j[unknown]])
        vals.append(np.full(int(unknown.sum()), weight))
        rhs[inside[~unknown]] -= weight * flat[:, j[~unknown]].T
    rows.append(np.arange(idx.size))
    cols.append(np.arange(idx.size))
    vals.append(-diag)
    system = csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(idx.size,) * 2)
    solution = np.asarray(spsolve(system, rhs)).reshape(idx.size, c)
    if noise:
        solution = solution + (rng or np.random.default_rng(0)).normal(0.0, noise, solution.shape)
    out = flat.copy()
    out[:, idx] = solution.T
    return out.reshape(c, h, w).astype(image.dtype)


def _ranks(maps: np.ndarray | Tensor) -> np.ndarray:
    """(B, H, W) maps -> (B, H·W) rank of each pixel, 0 for the most relevant."""
    m = np.asarray(maps, dtype=np.float32)
    if m.ndim != 3 or not np.isfinite(m).all():
        raise VisattnError(f"maps must be finite, shaped (B, H, W); got {m.shape}")
    flat = m.reshape(len(m), -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(flat.shape[1])[None].repeat(len(m), 0), axis=1)
    return ranks


def _run(model: nn.Module, batch: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(batch[i : i + batch_size]).float() for i in range(0, len(batch), batch_size)])


def road(model: nn.Module, images: Tensor, maps: np.ndarray | Tensor, targets: Tensor | list[int],
         fractions: tuple[float, ...] = ROAD_FRACTIONS, noise: float = 0.01, seed: int = 0,
         batch_size: int = 64) -> dict[str, np.ndarray]:
    """ROAD without retraining (definition in the module docstring).

    Args:
        model: classifier. images: (B, 3, H, W) as the model takes them. maps: (B, H, W).
        targets: (B,) classes whose probability is tracked. fractions: removed fractions.
        noise: imputation noise. seed: for the noise. batch_size: images per forward.

    Returns:
        "morf_curve" / "lerf_curve" (B, len(fractions)) probabilities; "road_morf",
        "road_lerf", "road_combined" (B,); "fractions". One sparse solve per image, order and
        fraction; ⌈18·B / batch_size⌉ forwards.
    """
    x = images.detach().float().cpu()
    b, _, h, w = x.shape
    ranks, rng = _ranks(maps), np.random.default_rng(seed)
    if ranks.shape != (b, h * w):
        raise VisattnError(f"maps must be shaped {(b, h, w)}; got {np.shape(maps)}")
    counts = [int(round(f * h * w)) for f in fractions]
    filled = [impute(x[i].numpy(), (ranks[i] < k if most else ranks[i] >= h * w - k).reshape(h, w), noise, rng)
              for most in (True, False) for i in range(b) for k in counts]
    device = next(model.parameters(), images).device
    probs = _run(model, torch.from_numpy(np.stack(filled)).to(device), batch_size).softmax(1)
    t = torch.as_tensor(targets).long().reshape(b).to(device)
    chosen = probs.reshape(2, b, len(counts), -1).gather(3, t[None, :, None, None].expand(2, b, len(counts), 1))
    morf, lerf = chosen[..., 0].cpu().numpy()
    return {"morf_curve": morf, "lerf_curve": lerf, "road_morf": morf.mean(1), "road_lerf": lerf.mean(1),
            "road_combined": ((lerf - morf) / 2).mean(1), "fractions": np.asarray(fractions)}


def positive_negative(model: nn.Module, images: Tensor, maps: np.ndarray | Tensor, labels: Tensor | list[int],
                      fill: Tensor | list[float] | float = 0.0,
                      fractions: tuple[float, ...] = PERTURBATION_FRACTIONS,
                      batch_size: int = 64) -> dict[str, np.ndarray]:
    """Chefer et al.'s positive and negative perturbation (definition in the module docstring).

    Args:
        model: classifier. images: (B, 3, H, W) as the model takes them. maps: (B, H, W).
        labels: (B,) true classes. fill: what a removed pixel becomes, per channel or one
            value (black after normalisation: −mean/std). fractions: removed fractions, 0 first.

    Returns:
        "positive_curve" / "negative_curve" (len(fractions),) top-1 accuracy;
        "positive_auc", "negative_auc" (floats, as 0-d arrays); "fractions".
        ⌈B / batch_size⌉ forwards per order and fraction.
    """
    x = images.detach().float()
    b, c, h, w = x.shape
    ranks = torch.from_numpy(_ranks(maps)).to(x.device)
    if tuple(ranks.shape) != (b, h * w):
        raise VisattnError(f"maps must be shaped {(b, h, w)}; got {np.shape(maps)}")
    value = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1, 1, 1).expand(c, h, w)
    y = torch.as_tensor(labels).long().reshape(b).to(x.device)
    curves = []
    for most in (True, False):
        accuracy = []
        for f in fractions:
            k = int(round(f * h * w))
            removed = (ranks < k) if most else (ranks >= h * w - k)
            batch = torch.where(removed.reshape(b, 1, h, w), value, x)
            accuracy.append(float((_run(model, batch, batch_size).argmax(1).to(y.device) == y).float().mean()))
        curves.append(np.asarray(accuracy))
    f = np.asarray(fractions)

    def auc(curve: np.ndarray) -> np.ndarray:
        return np.asarray(((curve[1:] + curve[:-1]) / 2 * np.diff(f)).sum())

    return {"positive_curve": curves[0], "negative_curve": curves[1], "positive_auc": auc(curves[0]),
            "negative_auc": auc(curves[1]), "fractions": f}
