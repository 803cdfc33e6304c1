"""Break attention on purpose and see what the real model does: the scale of the logits
(softmax temperature, the 1/√d_k), the position encodings, single heads.

:func:`broken` captures one forward pass with any of the three breaks, for the calling thread
only: the scale through :func:`visattn.sites.rescaled` (at the one attention dispatch point,
so for every family :func:`visattn.capture` sees), positions through
:func:`visattn.positions.positions_off`, heads through :func:`visattn.ablation.ablating`. All
three are per-thread (``ContextVar`` or a per-thread ``TorchFunctionMode``): a model shared
between Streamlit sessions is never changed and other threads never see the breaks.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from visattn.ablation import ablating
from visattn.errors import VisattnError
from visattn.positions import positions_off
from visattn.sites import DEFAULT_BUDGET_BYTES, ScaleEdit, rescaled
from visattn.tracing import Trace, capture


class BreakError(VisattnError, ValueError):
    """A break that cannot be made (a scale that is not a positive number)."""


def scaling(scale: float = 1.0, sqrt_d: bool = True) -> ScaleEdit:
    """The logit-scale edit of :func:`broken`: the layer's scale times ``scale``, with 1/√d_k
    taken out first when ``sqrt_d`` is False (dot-product layers; a cosine layer's learned
    temperature is kept).

    >>> edit = scaling(2.0, sqrt_d=False)
    >>> edit(None, 0.125, 64, "dot"), edit(None, 10.0, 64, "cosine")
    (2.0, 20.0)
    """
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise BreakError(f"the scale factor must be a positive number, not {scale!r}")

    def edit(module: nn.Module, layer_scale, d_k: int, similarity: str):
        return (1.0 if similarity == "dot" and not sqrt_d else layer_scale) * scale

    return edit


def broken(model: nn.Module, images: Tensor, *, scale: float = 1.0, sqrt_d: bool = True, positions: bool = True,
           heads: Mapping[str, Sequence[int]] | None = None, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> Trace:
    """Capture ``model(images)`` (logits and every attention site) with attention broken.

    Args:
        model, images: as for :func:`visattn.capture`.
        scale: multiplies every attention layer's logit scale (1/√d_k, or a cosine layer's
            learned temperature): > 1 sharpens the softmax, < 1 flattens it (the softmax
            temperature is 1/scale). A relative-position bias is added unchanged.
        sqrt_d: False drops the 1/√d_k of dot-product layers (the scores Q·Kᵀ go to the
            softmax as they are, times ``scale``).
        positions: False runs without position tables and sinusoidal codes
            (:func:`visattn.positions.positions_off`; PositionsError when there are none).
        heads: ``{layer: [head, ...]}`` whose outputs are set to zero, as :func:`visattn.ablate`.

    Nothing broken gives exactly ``capture(model, images)``. Errors are one line
    (BreakError, PositionsError, AblationError).

    >>> import torch
    >>> from visattn import create_model
    >>> model, x = create_model("hybrid_vit", depth=2).eval(), torch.rand(1, 3, 32, 32)
    >>> trace = broken(model, x, scale=0.1, positions=False, heads={"blocks.1.attn": [0]})
    >>> tuple(trace.logits.shape), round(trace.attention["blocks.0.attn"].scale, 4)
    ((1, 10), 0.0177)
    >>> torch.equal(broken(model, x).logits, capture(model, x).logits)
    True
    """
    edit = scaling(scale, sqrt_d)
    with contextlib.ExitStack() as stack:
        if scale != 1.0 or not sqrt_d:
            stack.enter_context(rescaled(edit))
        if not positions:
            stack.enter_context(positions_off(model))
        if heads:
            stack.enter_context(ablating(model, heads))
        return capture(model, images, budget_bytes=budget_bytes)
