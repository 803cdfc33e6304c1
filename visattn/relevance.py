"""Relevance made for transformers: class-specific token maps from gradient-weighted attention.

``gae``: generic attention explainability (Chefer, Gur & Wolf, ICCV 2021). For each layer
of the deepest run of attention sites, Ā = mean over heads of (∇A ⊙ A)⁺ (∇A: gradient of the
target logit), and relevance accumulates as R ← R + Ā·R from R = I. Works on every model the
capture sees (gradients of the captured weights).

``transformer_attribution``: Chefer, Gur & Wolf, CVPR 2021 ("Transformer Interpretability
Beyond Attention Visualization"): Ā = mean over heads of (∇A ⊙ R_A)⁺ with R_A the LRP
relevance of the attention weights, and the joint map Π (I + Ā) (rows not renormalised, as
in the authors' code). R_A comes from a re-run of the transformer blocks with LRP rules as
modified gradients: z⁺ (α=1, β=0) on linear layers, identity through LayerNorm, GELU and
softmax, half to each side of the attention products, LRP-0 on residual adds (the paper
rescales the two branches of an add; nothing else differs). It needs the block structure, so
it is defined for pre-norm transformer families it knows (hybrid_vit, torchvision ViTs);
elsewhere it returns None. Its relevance is conserved: the relevance reaching the first
block's input tokens sums to the target logit (:attr:`TokenRelevance.conservation`).

Readout: the row of the prefix (CLS) token. Models without one (hybrid_vit pools its tokens)
read the rows weighted by each final token's own relevance: (∇context ⊙ context)⁺ of the last
attention layer's output for ``gae``, the LRP relevance of the final tokens for
``transformer_attribution``; for a CLS model both weightings are the CLS row itself.

Nothing is attached to the model; no parameter ``.grad`` is written (``torch.autograd.grad``
with respect to the activations only); train/eval mode is left as it is.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from visattn.errors import VisattnError
from visattn.tracing import capture


class RelevanceError(VisattnError, ValueError):
    """Relevance that cannot be computed (attention weights over the memory budget)."""


@dataclass
class TokenRelevance:
    """Relevance of each token for each image's target class."""

    tokens: Tensor  # (B, N), prefix tokens first
    grid: tuple[int, int]
    prefix: int
    targets: list[int]
    conservation: np.ndarray | None = None  # (B,) |Σ input relevance − logit| / |logit|, where defined

    def maps(self) -> np.ndarray:
        """Grid-token relevance as (B, H, W) float32, non-negative."""
        grid = self.tokens[:, self.prefix:].clamp(min=0).reshape(-1, *self.grid)
        return grid.detach().float().cpu().numpy()


def _targets(logits: Tensor, targets: Tensor | list[int] | int | None) -> Tensor:
    if targets is None:
        return logits.argmax(1)
    return torch.as_tensor(targets, device=logits.device).long().reshape(-1).expand(logits.shape[0])


def _readout(joint: Tensor, weights: Tensor | None, prefix: int) -> Tensor:
    """(B, N, N) joint relevance -> (B, N): the CLS row, else rows weighted by ``weights`` (B, N)."""
    if prefix > 0 or weights is None:
        return joint[:, 0] if prefix > 0 else joint.mean(1)
    w = weights.clamp(min=0)
    total = w.sum(1, keepdim=True)
    w = torch.where(total > 0, w / total.clamp_min(torch.finfo(w.dtype).tiny), torch.full_like(w, 1 / w.shape[1]))
    return torch.einsum("bi,bij->bj", w, joint)


def gae(model: nn.Module, images: Tensor, targets: Tensor | list[int] | int | None = None) -> TokenRelevance | None:
    """Gradient-weighted attention rollout (Chefer et al., ICCV 2021) for a batch; None if the
    model has no attention site.

    Args:
        model: classifier. images: (B, 3, H, W). targets: class per image (or one for all);
            None: the predicted classes.

    >>> from visattn import create_model
    >>> r = gae(create_model("hybrid_vit", depth=2).eval(), torch.rand(2, 3, 32, 32))
    >>> r.tokens.shape, r.maps().shape
    (torch.Size([2, 64]), (2, 8, 8))
    """
    from visattn.maps import _deepest_run

    # the input requires grad, so the graph exists even while another thread has frozen the parameters
    trace = capture(model, images.detach().clone().requires_grad_(), grad=True)
    if not trace.attention:
        return None
    sites = _deepest_run(list(trace.attention.values()))
    if any(s.weights is None for s in sites):
        raise RelevanceError("attention weights over the capture's memory budget: use fewer or smaller images")
    t = _targets(trace.logits, targets)
    last = sites[-1]
    wanted = [s.weights for s in sites] + ([last.context] if last.context is not None else [])
    grads = torch.autograd.grad(trace.logits.gather(1, t[:, None]).sum(), wanted, allow_unused=True)
    b, n = last.weights.shape[0], last.weights.shape[-1]
    joint = torch.eye(n).expand(b, n, n)
    for site, g in zip(sites, grads):
        g = torch.zeros_like(site.weights) if g is None else g
        cam = (g * site.weights).clamp(min=0).mean(1).detach().float()  # (B, N, N)
        joint = joint + cam @ joint
    weights = None
    if last.context is not None and grads[-1] is not None:
        weights = (grads[-1] * last.context).sum(-1).detach().float()  # (B, N)
    return TokenRelevance(_readout(joint, weights, last.prefix), last.grid, last.prefix, t.tolist())


# ---------------------------------------------------------------- LRP as modified gradients

def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    """a / b, and 0 where |b| <= 1e-9 (a finite a divided by inf)."""
    return a / torch.where(b.abs() > 1e-9, b, torch.inf)


def _surrogate(value: Tensor, carrier: Tensor) -> Tensor:
    """``value`` forward, ``carrier``'s gradient backward."""
    return value.detach() + carrier - carrier.detach()


class _Ops:
    """The block's operations: plain, or with LRP rules as modified gradients (then
    ``x ⊙ ∂y/∂x`` is the LRP relevance of ``x``); forward values are the same either way."""

    def __init__(self, lrp: bool) -> None:
        self.lrp = lrp

    def linear(self, x: Tensor, layer: nn.Linear | tuple[Tensor, Tensor | None]) -> Tensor:
        w, b = (layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer
        z = F.linear(x, w, b)
        if not self.lrp:
            return z
        # z⁺ rule: x⁺w⁺ + x⁻w⁻, as one matmul over the two halves side by side
        zp = F.linear(torch.cat([x.clamp(min=0), x.clamp(max=0)], -1), torch.cat([w.clamp(min=0), w.clamp(max=0)], 1))
        return _surrogate(z, zp * _safe_div(z, zp).detach())

    def identity_rule(self, f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        y = f(x)
        return _surrogate(y, x * _safe_div(y, x).detach()) if self.lrp else y

    def product(self, a: Tensor, b: Tensor) -> Tensor:
        if not self.lrp:
            return a @ b
        return _surrogate(a @ b, 0.5 * (a @ b.detach()) + 0.5 * (a.detach() @ b))


@dataclass
class _Block:
    """The parts of one pre-norm transformer block: x + attn(norm1 x), then + mlp(norm2 x)."""

    norm1: nn.Module
    qkv: tuple[Tensor, Tensor | None]
    heads: int
    proj: nn.Linear
    norm2: nn.Module
    fc1: nn.Linear
    act: nn.Module
    fc2: nn.Linear

    def forward(self, x: Tensor, ops: _Ops, weights: list[Tensor]) -> Tensor:
        b, n, c = x.shape
        h = ops.identity_rule(self.norm1, x)
        q, k, v = ops.linear(h, self.qkv).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        s = ops.product(q / math.sqrt(c // self.heads), k.transpose(-2, -1))  # (B, h, N, N)
        a = ops.identity_rule(lambda t: t.softmax(-1), s)
        weights.append(a)
        x = x + ops.linear(ops.product(a, v).transpose(1, 2).reshape(b, n, c), self.proj)
        y = ops.linear(ops.identity_rule(self.act, ops.linear(ops.identity_rule(self.norm2, x), self.fc1)), self.fc2)
        return x + y


@dataclass
class _Transformer:
    """A token model seen as: embed (images -> first block's input), blocks, norm, readout."""

    embed: Callable[[Tensor], Tensor]
    blocks: list[_Block]
    norm: nn.Module
    readout: Callable[[Tensor, _Ops], Tensor]  # final tokens (normed) -> logits
    grid: tuple[int, int]
    prefix: int

    def forward(self, x: Tensor, ops: _Ops) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(logits, final tokens before the norm, attention weights per block)."""
        weights: list[Tensor] = []
        for block in self.blocks:
            x = block.forward(x, ops, weights)
        return self.readout(ops.identity_rule(self.norm, x), ops), x, weights


def _hybrid(model: nn.Module) -> _Transformer:
    blocks = [_Block(b.norm1, (b.attn.qkv.weight, b.attn.qkv.bias), b.attn.heads, b.attn.proj,
                     b.norm2, b.mlp[0], b.mlp[1], b.mlp[2]) for b in model.blocks]

    def embed(images: Tensor) -> Tensor:
        t = model.tokenizer(images).flatten(2).transpose(1, 2)
        return torch.cat([model.cls.expand(len(t), -1, -1), t], dim=1) + model.pos_embed

    def readout(t: Tensor, ops: _Ops) -> Tensor:
        if model.use_cls:
            return ops.linear(t[:, 0], model.fc)
        w = ops.identity_rule(lambda z: z.softmax(1), ops.linear(t, model.pool))  # (B, N, 1)
        return ops.linear(ops.product(w.transpose(1, 2), t)[:, 0], model.fc)

    return _Transformer(embed, blocks, model.norm, readout, model.blocks[0].attn.grid, model.blocks[0].attn.prefix)


def _torchvision_vit(model: nn.Module) -> _Transformer:
    blocks = [_Block(b.ln_1, (b.self_attention.in_proj_weight, b.self_attention.in_proj_bias), b.self_attention.num_heads,
                     b.self_attention.out_proj, b.ln_2, b.mlp[0], b.mlp[1], b.mlp[3]) for b in model.encoder.layers]

    def embed(images: Tensor) -> Tensor:
        t = model._process_input(images)
        return torch.cat([model.class_token.expand(len(t), -1, -1), t], dim=1) + model.encoder.pos_embedding

    def readout(t: Tensor, ops: _Ops) -> Tensor:
        z = t[:, 0]
        for layer in model.heads:
            z = ops.linear(z, layer) if isinstance(layer, nn.Linear) else ops.identity_rule(layer, z)
        return z

    side = model.image_size // model.patch_size
    return _Transformer(embed, blocks, model.encoder.ln, readout, (side, side), 1)


def _as_transformer(model: nn.Module) -> _Transformer | None:
    from torchvision.models.vision_transformer import VisionTransformer

    from visattn.models.hybrid_vit import HybridViT

    if isinstance(model, HybridViT):
        return _hybrid(model)
    if isinstance(model, VisionTransformer):
        return _torchvision_vit(model)
    return None


def transformer_attribution(model: nn.Module, images: Tensor,
                            targets: Tensor | list[int] | int | None = None) -> TokenRelevance | None:
    """Transformer attribution (Chefer et al., CVPR 2021) for a batch; None for a model
    whose blocks it does not know (see the module docstring). Two passes through the
    transformer blocks: a plain one for ∇A, an LRP one for R_A.

    >>> from visattn import create_model
    >>> r = transformer_attribution(create_model("hybrid_vit", depth=2).eval(), torch.rand(2, 3, 32, 32))
    >>> r.maps().shape, bool((r.conservation < 0.01).all())
    ((2, 8, 8), True)
    """
    spec = _as_transformer(model)
    if spec is None:
        return None
    with torch.no_grad():
        x0 = spec.embed(images.detach())
    with torch.enable_grad():
        logits, _, plain = spec.forward(x0.clone().requires_grad_(), _Ops(lrp=False))
        t = _targets(logits, targets)
        grads = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), plain)
        x = x0.clone().requires_grad_()
        lrp_logits, final, weights = spec.forward(x, _Ops(lrp=True))
        chosen = lrp_logits.gather(1, t[:, None])[:, 0]
        relevance = torch.autograd.grad(chosen.sum(), [*weights, final, x])
    scale = _safe_div(torch.ones_like(chosen), chosen).detach()[:, None, None, None]  # seed 1 at the target
    b, n = x0.shape[:2]
    joint = torch.eye(n).expand(b, n, n)
    for a, g, r in zip(weights, grads, relevance):
        cam = (g * (a * r * scale)).clamp(min=0).mean(1).detach().float()  # (B, N, N)
        joint = joint + cam @ joint
    final_relevance = (final * relevance[-2]).sum(-1).detach().float()
    inputs = (x * relevance[-1]).sum(dim=(1, 2)).detach()
    conservation = ((inputs - chosen.detach()).abs() / chosen.detach().abs().clamp_min(1e-12)).cpu().numpy()
    return TokenRelevance(_readout(joint, final_relevance, spec.prefix), spec.grid, spec.prefix, t.tolist(),
                          conservation)
