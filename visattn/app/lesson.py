"""The Learn page's five steps: one head's attention step recomputed from the recorded
Q, K and V of one query token, each step checked against what the layer did; and the words
of its sixth, "break it" (:func:`visattn.breaking.broken`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from visattn.app.views import token_cell
from visattn.errors import VisattnError
from visattn.positions import PositionEncoding
from visattn.sites import AttentionSite
from visattn.tracing import Trace


@dataclass
class Lesson:
    """The numbers of one attention step for one query token and one head.

    Vectors are 1-D NumPy arrays; ``*_grid`` maps are (H, W) over the grid keys.
    """

    layer: str
    head: int
    heads: int
    token: int
    cell: tuple[int, int] | None
    similarity: str  # "dot" or "cosine"
    d_k: int
    scale: float
    q: np.ndarray  # (d_k,)
    k: np.ndarray  # (d_k,) the key at the query's own position
    v: np.ndarray  # (d_v,) the value at the query's own position
    dot: np.ndarray  # (N,) q·k_j
    cosine: np.ndarray  # (N,) cos(q, k_j)
    scores: np.ndarray  # (N,) what this layer compares: dot or cosine
    logits: np.ndarray  # (N,) scores × scale (+ relative-position bias)
    bias: np.ndarray | None  # (N,) the bias added, if any
    weights: np.ndarray  # (N,) softmax(logits): sum 1
    layer_weights: np.ndarray  # (N,) the weights the layer really used (recorded)
    weights_error: float  # max |weights - layer_weights|
    textbook: np.ndarray  # (N,) softmax(q·k / √d_k), whatever the layer uses
    top: list[tuple[int, str, float]]  # (token, "row r, col c" / "CLS", weight), best first
    head_context: np.ndarray  # (d_v,) Σ_j w_j v_j of this head
    head_context_check: float  # max |head_context - the layer's own (weights @ V)|
    inputs: np.ndarray | None = None  # (C,) what Q, K, V were computed from, at this position
    context: np.ndarray | None = None  # (C,) the attention output after the projection W_O
    outputs: np.ndarray | None = None  # (C,) after the residual add
    gate: float | None = None
    residual_error: float | None = None  # max |outputs - (inputs + gate·context)|
    grid: tuple[int, int] = (0, 0)
    prefix: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_grid(self, values: np.ndarray) -> np.ndarray:
        """(N,) over all keys -> (H, W) over the grid keys."""
        return np.asarray(values)[self.prefix :].reshape(self.grid)

    @property
    def sum_weights(self) -> float:
        return float(self.weights.sum())


def _host(t: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy outside autograd (sites of a CUDA model or a ``capture(grad=True)``)."""
    return t.detach().float().cpu()


def key_name(site: AttentionSite, token: int) -> str:
    cell = token_cell(site, token)
    return "CLS / extra token" if cell is None else f"row {cell[0]}, col {cell[1]}"


def lesson(site: AttentionSite, token: int, head: int, b: int = 0, top: int = 5) -> Lesson:
    """Recompute one head's attention step for query ``token`` from the recorded Q, K, V,
    and check each step against what the layer recorded.

    >>> ls = lesson(trace.attention["stages.1.1"], token=27, head=0)
    >>> round(ls.sum_weights, 6), ls.weights_error < 1e-4
    (1.0, True)
    """
    n = site.q.shape[2]
    if not 0 <= token < n:
        raise VisattnError(f"query token {token} outside 0..{n - 1}")
    if not 0 <= head < site.heads:
        raise VisattnError(f"head {head} outside 0..{site.heads - 1}")
    q = _host(site.q[b, head, token])  # every number is recomputed on the CPU, wherever the model ran
    keys = _host(site.k[b, head])  # (N, d_k)
    values = _host(site.v[b, head])  # (N, d_v)
    dot = keys @ q
    cosine = F.normalize(keys, dim=-1) @ F.normalize(q, dim=0)
    scores = cosine if site.similarity == "cosine" else dot
    bias = _host(site.bias[head, token]) if site.bias is not None else None
    logits = scores * site.scale + (bias if bias is not None else 0.0)
    weights = logits.softmax(-1)
    layer_weights = _host(site.row(b, token)[head])
    d_k = q.shape[0]
    textbook = (dot / math.sqrt(d_k)).softmax(-1)
    order = torch.argsort(weights, descending=True)[: min(top, n)].tolist()
    head_context = weights @ values
    recorded = layer_weights @ values
    les = Lesson(
        layer=site.name, head=head, heads=site.heads, token=token, cell=token_cell(site, token),
        similarity=site.similarity, d_k=d_k, scale=float(site.scale),
        q=q.numpy(), k=keys[token].numpy(), v=values[token].numpy(),
        dot=dot.numpy(), cosine=cosine.numpy(), scores=scores.numpy(), logits=logits.numpy(),
        bias=None if bias is None else bias.numpy(), weights=weights.numpy(), layer_weights=layer_weights.numpy(),
        weights_error=float((weights - layer_weights).abs().max()), textbook=textbook.numpy(),
        top=[(j, key_name(site, j), float(weights[j])) for j in order],
        head_context=head_context.numpy(), head_context_check=float((head_context - recorded).abs().max()),
        grid=tuple(site.grid), prefix=site.prefix,
    )
    if site.inputs is not None:
        les.inputs = _host(site.inputs[b, token]).numpy()
    if site.context is not None:
        les.context = _host(site.context[b, token]).numpy()
    if site.outputs is not None and site.inputs is not None and site.context is not None:
        les.outputs = _host(site.outputs[b, token]).numpy()
        les.gate = float(site.gate)
        les.residual_error = float(np.abs(les.outputs - (les.inputs + les.gate * les.context)).max())
    return les


def next_layer(trace: Trace, layer: str) -> str | None:
    """The attention layer after ``layer`` in forward order, or None for the last one."""
    names = list(trace.attention)
    i = names.index(layer) if layer in names else -1
    return names[i + 1] if 0 <= i < len(names) - 1 else None



#: The "break it" step's scale factors (a log-spaced slider).
SCALES = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 7.0, 10.0)


def breaks_line(scale: float, sqrt_d: bool, positions: bool, heads: dict[str, list[int]]) -> str:
    """What is broken, in words ("" when nothing is).

    >>> breaks_line(5.0, False, False, {"blocks.0.attn": [1, 2]})
    'scores ×5, not divided by √d_k · positions off · 2 heads removed'
    >>> breaks_line(1.0, False, True, {}), breaks_line(1.0, True, True, {})
    ('scores not divided by √d_k', '')
    """
    parts = []
    if scale != 1.0:
        parts.append(f"scores ×{scale:g}" + ("" if sqrt_d else ", not divided by √d_k"))
    elif not sqrt_d:
        parts.append("scores not divided by √d_k")
    if not positions:
        parts.append("positions off")
    n = sum(len(h) for h in heads.values())
    if n:
        parts.append(f"{n} head{'s' if n > 1 else ''} removed")
    return " · ".join(parts)


_OFF = {"learned absolute": "its values read as zeros", "relative bias": "its bias reads as zeros",
        "sinusoidal": "the code is not added"}


def positions_text(found: list[PositionEncoding], model: str = "This model") -> str:
    """What switching positions off means for this model, in one sentence.

    >>> from visattn.positions import PositionEncoding
    >>> positions_text([PositionEncoding("stages.1.1", "sinusoidal")], "sa_cnn")
    'sa_cnn has a sinusoidal code in `stages.1.1`; switched off, the code is not added.'
    >>> positions_text([])[:60]
    'This model has no position encoding: it can tell where thing'
    """
    switchable = [p for p in found if p.switchable]
    rotary = [p.name for p in found if not p.switchable]
    if switchable:
        kinds = sorted({p.kind for p in switchable})
        named = ", ".join((f"a sinusoidal code in `{p.name}`" if p.kind == "sinusoidal" else f"a {p}")
                          for p in switchable[:3]) + (f" and {len(switchable) - 3} more" if len(switchable) > 3 else "")
        text = f"{model} has {named}; switched off, {' and '.join(_OFF[k] for k in kinds)}."
        return text + (f" Its rotary embeddings ({', '.join(rotary)}) stay on." if rotary else "")
    if rotary:
        return f"{model} turns Q and K by rotary embeddings ({', '.join(rotary)}), which cannot be switched off here."
    return (f"{model} has no position encoding: it can tell where things are only through its convolutions "
            "(their zero padding at the borders), so there is nothing to switch off.")
