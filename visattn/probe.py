"""The probe of a training run: what each attention layer does on a few fixed images,
measured while the model learns.

Per attention layer: the map of attention each position of the probe image receives
(averaged over heads and queries) and the mean entropy of the attention rows (over images,
heads and queries, in nats). Uniform attention over N keys has entropy log N; a layer that
learns to look somewhere falls below it.

>>> import torch
>>> from visattn.models import create_model
>>> model = create_model("sa_cnn", widths=(8, 16, 16), heads=2)
>>> p = probe(model, torch.randn(2, 3, 32, 32))
>>> [(name, len(v["received"]), round(v["uniform"], 3)) for name, v in p.items()]
[('stages.1.1', 8, 4.159)]
>>> model.training  # the probe leaves the mode as it found it
True
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


def row_entropy(weights: Tensor) -> Tensor:
    """Entropy in nats of each attention row: (..., N) -> (...).

    >>> round(row_entropy(torch.full((1, 4), 0.25)).item(), 5), round(math.log(4), 5)
    (1.38629, 1.38629)
    """
    w = weights.float()
    return -(w * w.clamp_min(1e-12).log()).sum(-1)


@torch.no_grad()
def probe(model: nn.Module, images: Tensor) -> dict[str, dict[str, Any]]:
    """``{layer: {"received": grid map of image 0, "entropy": mean row entropy, "uniform": log N}}``
    for every self-attention layer of ``model`` on normalised ``images`` (B, 3, H, W).
    Runs in eval mode and restores the model's training mode; the model is not changed."""
    from visattn.tracing import capture
    from visattn.maps import received_attention

    was_training = model.training
    model.eval()
    try:
        sites = capture(model, images).attention
    finally:
        model.train(was_training)
    out = {}
    for name, s in sites.items():
        rows = torch.stack([s.full_weights(b) for b in range(len(images))])  # (B, heads, N, N)
        rows = rows[:, :, s.prefix :]  # the grid tokens' queries, over every key
        out[name] = {
            "received": received_attention(s, 0).mean(0).tolist(),
            "entropy": row_entropy(rows).mean().item(),
            "uniform": math.log(s.k.shape[2]),
        }
    return out
