"""Model-evaluation helpers of the Models and Compare pages: test-set accuracy and
confusion, per-head statistics, one explanation method at a time and its
cascading-randomisation sanity check (the deletion/insertion scores of one image are
``visattn.faithfulness.faithfulness_for``)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from visattn.errors import VisattnError
from visattn.inference import input_size, model_inputs
from visattn.tracing import capture
from visattn.train import confusion_matrix, per_class_accuracy


# ----------------------------------------------------------------------------- Models page
@torch.no_grad()
def evaluate_sample(model: nn.Module, meta: dict[str, Any], split, n: int = 1000, seed: int = 0,
                    batch_size: int = 250) -> dict[str, np.ndarray]:
    """Predictions on a fixed random sample of ``n`` test images.

    Returns ``indices`` (into the split), ``labels``, ``pred``, ``confusion`` (k, k; rows
    true, columns predicted), ``per_class`` accuracy (k,) and ``accuracy`` (scalar array).
    Classes are the split's; a model with other classes (ImageNet) is refused.
    """
    k = len(split.classes)
    if len(meta.get("classes", [])) != k:
        raise VisattnError(f"this model predicts {len(meta.get('classes', []))} classes; the test set has {k}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(split), generator=g)[: min(n, len(split))]
    device = next(model.parameters()).device
    preds = []
    for i in range(0, len(idx), batch_size):
        x = model_inputs(split.images[idx[i : i + batch_size]], meta).to(device)
        preds.append(model(x).argmax(1).cpu())
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)
    labels = split.labels[idx]
    confusion = confusion_matrix(labels, pred, k)
    per_class = per_class_accuracy(confusion)
    return {
        "indices": idx.numpy(), "labels": labels.numpy(), "pred": pred.numpy(), "confusion": confusion.numpy(),
        "per_class": per_class.numpy(),
        "accuracy": np.asarray((pred == labels).float().mean().item() if len(idx) else 0.0),
    }


def misclassified(result: dict[str, np.ndarray], true: int, predicted: int) -> np.ndarray:
    """Split indices of the sampled images with label ``true`` predicted as ``predicted``."""
    mask = (result["labels"] == true) & (result["pred"] == predicted)
    return result["indices"][mask]


@torch.no_grad()
def head_statistics(model: nn.Module, meta: dict[str, Any], images: torch.Tensor,
                    batch_size: int = 32) -> dict[str, dict[str, np.ndarray]]:
    """Per-head entropy (nats) and mean attention distance (input pixels), by layer,
    averaged over ``images`` (uint8 (B, 3, S, S)). Empty for a model without attention."""
    from visattn.maps import head_entropy, mean_attention_distance

    size = input_size(meta)
    device = next(model.parameters()).device
    sums: dict[str, dict[str, np.ndarray]] = {}
    total = 0
    for i in range(0, len(images), batch_size):
        x = model_inputs(images[i : i + batch_size], meta).to(device)
        trace = capture(model, x)
        nb = len(x)
        for name, site in trace.attention.items():
            cell = size / site.grid[1]
            ent = head_entropy(site) * nb
            dist = mean_attention_distance(site, cell_size=cell) * nb
            s = sums.setdefault(name, {"entropy": np.zeros_like(ent), "distance": np.zeros_like(dist),
                                       "max_entropy": np.asarray(math.log(site.q.shape[2]))})
            s["entropy"] = s["entropy"] + ent
            s["distance"] = s["distance"] + dist
        total += nb
    for s in sums.values():
        s["entropy"] = s["entropy"] / max(total, 1)
        s["distance"] = s["distance"] / max(total, 1)
    return sums


# ----------------------------------------------------------------------------- Compare page
HEAVY_PARAMS = 20_000_000
HEAVY_SIDE = 96


def is_heavy(model: nn.Module, meta: dict[str, Any]) -> bool:
    """Whether integrated gradients, occlusion and deletion/insertion take minutes on a CPU
    (a ViT-B/16 at 224 px does; the CIFAR models at 32 px take seconds)."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    return on_cpu and (sum(p.numel() for p in model.parameters()) > HEAVY_PARAMS or input_size(meta) > HEAVY_SIDE)


def explain_one(model: nn.Module, tensor: torch.Tensor, method: str, target: int, layer: str | None = None):
    """One ``visattn.explain.METHODS`` method, given ``layer`` when it takes one (Grad-CAM's
    layer, the attention site's); None when it does not apply (attention maps of a model
    without attention)."""
    from visattn.explain import method as method_row

    row = method_row(method)
    return row(model, tensor, target, layer=layer) if row.takes_layer else row(model, tensor, target)


def not_available(model: nn.Module, tensor: torch.Tensor, method: str, has_attention: bool) -> str:
    """The page's line for a method that gave no map on this model.

    >>> from visattn import create_model
    >>> not_available(create_model("sa_cnn"), torch.zeros(1, 3, 32, 32), "transformer_attribution", True)[:53]
    'Not available for this model: it is not a transformer'
    """
    from visattn.explain import why_unavailable

    reason = why_unavailable(model, tensor, method, has_attention)
    return "Not available for this model" + (f": {reason}." if reason else ".")


def sanity(model: nn.Module, tensor: torch.Tensor, target: int, method: str,
           layer: str | None = None) -> tuple[list[tuple[str, float]], bool]:
    """Cascading randomisation check of one method (``visattn.faithfulness.sanity_check``):
    ([(layer randomised, Spearman rho)], suspicious flag)."""
    from visattn.faithfulness import sanity_check, sanity_flag

    def run(m: nn.Module) -> np.ndarray:
        e = explain_one(m, tensor, method, target, layer)
        if e is None:
            raise VisattnError(f"{method} does not apply to this model")
        return e.map

    rho = sanity_check(model, tensor, target, run)
    return rho, sanity_flag(rho)
