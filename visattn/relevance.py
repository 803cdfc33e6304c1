"""Relevance made for transformers: class-specific token maps from gradient-weighted attention.

``gae``: generic attention explainability (Chefer, Gur & Wolf, ICCV 2021). For each layer
of the deepest run of attention sites, Ā = mean over heads of (∇A ⊙ A)⁺ (∇A: gradient of the
target logit), and relevance accumulates as R ← R + Ā·R from R = I. Works on every model the
capture sees (gradients of the captured weights).

``transformer_attribution``: Chefer, Gur & Wolf, CVPR 2021 ("Transformer Interpretability
Beyond Attention Visualization"): Ā = mean over heads of (∇A ⊙ R_A)⁺ with R_A the LRP
relevance of the attention weights, and the joint map Π (I + Ā) (rows not renormalised, as
in the authors' code). R_A comes from the LRP rules as modified gradients (``x ⊙ g`` is the
relevance of ``x``), written out as a backward pass over the plain pass's own forward values
(:meth:`_Block.relprop`; no second forward, no graph): z⁺ (α=1, β=0) on linear layers, identity through LayerNorm, GELU and
softmax, half to each side of the attention products, LRP-0 on residual adds (the paper
rescales the two branches of an add; nothing else differs). It needs the block structure, so
it is defined for the pre-norm transformer families it knows: hybrid_vit, torchvision ViTs,
timm ViTs (DeiT distilled, registers, q/k norm, LayerScale; token or average pooling) and
Hugging Face ViT, DeiT and DINOv2 (with registers) classifiers; elsewhere it returns None and
:func:`unsupported` says why. Its relevance is conserved: the relevance reaching the first
block's input tokens sums to the target logit (:attr:`TokenRelevance.conservation`).

Readout: the rows weighted by each final token's own relevance for the target: (∇context ⊙
context)⁺ of the last attention layer's output for ``gae``, the LRP relevance of the final
tokens for ``transformer_attribution``. For a model that reads its CLS token alone this is
the CLS row; a distilled DeiT mixes its CLS and distillation rows, a pooled model (hybrid_vit,
DINOv2's CLS + mean head) its tokens' rows. Where no token has positive relevance: the CLS
row, or the mean row without a prefix.

Nothing is attached to the model; no parameter ``.grad`` is written (``torch.autograd.grad``
with respect to the activations only); train/eval mode is left as it is.
"""
from __future__ import annotations

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
    """(B, N, N) joint relevance -> (B, N): rows weighted by ``weights`` (B, N), the final
    tokens' relevance (its positive part); the CLS row (mean row without a prefix) where none
    is positive or no weights are given."""
    fallback = joint[:, 0] if prefix > 0 else joint.mean(1)
    if weights is None:
        return fallback
    w = weights.clamp(min=0)
    total = w.sum(1, keepdim=True)
    weighted = torch.einsum("bi,bij->bj", w / total.clamp_min(torch.finfo(w.dtype).tiny), joint)
    return torch.where(total > 0, weighted, fallback)


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

    def __init__(self, lrp: bool, notes: list[dict[str, Tensor]] | None = None) -> None:
        self.lrp = lrp
        self.notes = notes  # each block's forward values, for _Block.relprop

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
    """The parts of one pre-norm transformer block: x + ls1(attn(norm1 x)), then + ls2(mlp(norm2 x)).
    Optional parts (timm / Hugging Face variants): q/k norms, a norm before the output
    projection, one inside the MLP, LayerScale. Norms take the identity rule; LayerScale is
    elementwise and linear, so relevance passes it unchanged with the plain gradient."""

    norm1: nn.Module
    qkv: tuple[Tensor, Tensor | None]
    heads: int
    scale: float
    proj: nn.Linear
    norm2: nn.Module
    fc1: nn.Linear
    act: nn.Module
    fc2: nn.Linear
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None
    attn_norm: nn.Module | None = None
    mlp_norm: nn.Module | None = None
    ls1: nn.Module | None = None
    ls2: nn.Module | None = None

    def forward(self, x: Tensor, ops: _Ops, weights: list[Tensor]) -> Tensor:
        b, n, _ = x.shape
        h1 = ops.identity_rule(self.norm1, x)
        qkv = ops.linear(h1, self.qkv)
        q, k, v = qkv.reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        qn, kn = (q, k) if self.q_norm is None else (ops.identity_rule(self.q_norm, q), ops.identity_rule(self.k_norm, k))
        qs = qn * self.scale
        s = ops.product(qs, kn.transpose(-2, -1))  # (B, h, N, N)
        a = ops.identity_rule(lambda t: t.softmax(-1), s)
        weights.append(a)
        c = ops.product(a, v).transpose(1, 2).reshape(b, n, -1)
        c2 = c if self.attn_norm is None else ops.identity_rule(self.attn_norm, c)
        y1 = ops.linear(c2, self.proj)
        y1s = y1 if self.ls1 is None else self.ls1(y1)
        xm = x + y1s
        h2 = ops.identity_rule(self.norm2, xm)
        u = ops.linear(h2, self.fc1)
        ua = ops.identity_rule(self.act, u)
        ua2 = ua if self.mlp_norm is None else ops.identity_rule(self.mlp_norm, ua)
        y2 = ops.linear(ua2, self.fc2)
        y2s = y2 if self.ls2 is None else self.ls2(y2)
        if ops.notes is not None:
            ops.notes.append(dict(x=x, h1=h1, qkv=qkv, q=q, k=k, v=v, qn=qn, kn=kn, qs=qs, s=s, a=a, c=c, c2=c2, y1=y1,
                                  y1s=y1s, xm=xm, h2=h2, u=u, ua=ua, ua2=ua2, y2=y2, y2s=y2s))
        return xm + y2s

    def relprop(self, v: dict[str, Tensor], g: Tensor) -> tuple[Tensor, Tensor]:
        """The LRP pass of :meth:`forward` written out, on the plain pass's values ``v``:
        the modified gradient ``g`` at the block's output -> (at its input, at its attention
        weights). Equal to autograd through ``forward`` with ``_Ops(lrp=True)``, without
        computing the forward values again or building a graph."""
        b, n, _ = g.shape
        g_y2 = g if self.ls2 is None else _ratio_back(g, v["y2s"], v["y2"])
        g_ua2 = _linear_back(g_y2, v["ua2"], v["y2"], self.fc2)
        g_ua = g_ua2 if self.mlp_norm is None else _ratio_back(g_ua2, v["ua2"], v["ua"])
        g_h2 = _linear_back(_ratio_back(g_ua, v["ua"], v["u"]), v["h2"], v["u"], self.fc1)
        g_xm = g + _ratio_back(g_h2, v["h2"], v["xm"])
        g_y1 = g_xm if self.ls1 is None else _ratio_back(g_xm, v["y1s"], v["y1"])
        g_c2 = _linear_back(g_y1, v["c2"], v["y1"], self.proj)
        g_c = g_c2 if self.attn_norm is None else _ratio_back(g_c2, v["c2"], v["c"])
        g_c = g_c.reshape(b, n, self.heads, -1).transpose(1, 2)  # (B, h, N, d)
        g_a = 0.5 * (g_c @ v["v"].transpose(-2, -1))
        g_v = 0.5 * (v["a"].transpose(-2, -1) @ g_c)
        g_s = _ratio_back(g_a, v["a"], v["s"])
        g_q = 0.5 * (g_s @ v["kn"]) * self.scale
        g_k = 0.5 * (g_s.transpose(-2, -1) @ v["qs"])
        if self.q_norm is not None:
            g_q, g_k = _ratio_back(g_q, v["qn"], v["q"]), _ratio_back(g_k, v["kn"], v["k"])
        g_qkv = torch.stack([g_q, g_k, g_v]).permute(1, 3, 0, 2, 4).reshape(b, n, -1)
        g_h1 = _linear_back(g_qkv, v["h1"], v["qkv"], self.qkv)
        return g_xm + _ratio_back(g_h1, v["h1"], v["x"]), g_a


def _ratio_back(g: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """The identity rule's modified gradient at ``x`` from the one at ``y`` = f(x)."""
    return g * _safe_div(y, x)


def _linear_back(g: Tensor, x: Tensor, z: Tensor, layer: nn.Linear | tuple[Tensor, Tensor | None]) -> Tensor:
    """The z⁺ rule's modified gradient at the input ``x`` of ``layer`` (output ``z``):
    x⁺w⁺ + x⁻w⁻ = (xw + |x||w|) / 2, so one matmul with |w| gives it from z."""
    w, b = (layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer
    wa = w.abs()
    zp = F.linear(x.abs(), wa, None if b is None else -b).add_(z).mul_(0.5)
    s = g * _safe_div(z, zp)
    return 0.5 * (s @ w + x.sign() * (s @ wa))


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
    blocks = [_Block(b.norm1, (b.attn.qkv.weight, b.attn.qkv.bias), b.attn.heads, (b.attn.proj.in_features
                     // b.attn.heads) ** -0.5, b.attn.proj, b.norm2, b.mlp[0], b.mlp[1], b.mlp[2]) for b in model.blocks]

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
    blocks = []
    for b in model.encoder.layers:
        sa = b.self_attention
        blocks.append(_Block(b.ln_1, (sa.in_proj_weight, sa.in_proj_bias), sa.num_heads, sa.head_dim ** -0.5,
                             sa.out_proj, b.ln_2, b.mlp[0], b.mlp[1], b.mlp[3]))

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


def _unless_identity(m: nn.Module) -> nn.Module | None:
    return None if isinstance(m, nn.Identity) else m


def _timm_vit(model: nn.Module, hw: tuple[int, int]) -> _Transformer | str:
    """timm's VisionTransformer (and DeiT's distilled one): token or average pooling, plain
    blocks with timm's Attention and Mlp (q/k norm, scale norms, LayerScale allowed)."""
    from timm.layers import Mlp
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block

    from visattn.tokens import token_layout

    distilled = getattr(model, "dist_token", None) is not None
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg") and not distilled:
        return f"its head pools with {model.global_pool!r}; transformer attribution reads a CLS token or an average"
    if not isinstance(model.head, nn.Linear):
        return "it has no linear classifier head"
    blocks = []
    for b in model.blocks:
        if type(b) is not Block:
            return f"its blocks are {type(b).__name__}, not the pre-norm ViT block whose LRP rules are written here"
        if type(b.attn) is not Attention or getattr(b.attn, "gate", None) is not None:
            return f"its attention ({type(b.attn).__name__}, gated or not timm's plain one) has no LRP rule here"
        if type(b.mlp) is not Mlp:
            return f"its MLP is {type(b.mlp).__name__}: gated MLPs have no LRP rule here"
        a = b.attn
        blocks.append(_Block(b.norm1, (a.qkv.weight, a.qkv.bias), a.num_heads, a.scale, a.proj, b.norm2, b.mlp.fc1,
                             b.mlp.act, b.mlp.fc2, _unless_identity(a.q_norm), _unless_identity(a.k_norm),
                             _unless_identity(a.norm), _unless_identity(b.mlp.norm), _unless_identity(b.ls1),
                             _unless_identity(b.ls2)))
    layout = token_layout(model, hw)

    def embed(images: Tensor) -> Tensor:
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))

    def readout(t: Tensor, ops: _Ops) -> Tensor:
        if distilled:  # the eval-mode average of the two heads
            return (ops.linear(t[:, 0], model.head) + ops.linear(t[:, 1], model.head_dist)) / 2
        z = t[:, 0] if model.global_pool == "token" else t[:, 0 if model.pool_include_prefix else layout.prefix:].mean(1)
        if not isinstance(model.fc_norm, nn.Identity):
            z = ops.identity_rule(model.fc_norm, z)
        return ops.linear(z, model.head)

    return _Transformer(embed, blocks, model.norm, readout, layout.grid, layout.prefix)


_HF_HEADS = {  # Hugging Face classifier -> (its backbone's attribute, how the head reads the tokens)
    "ViTForImageClassification": ("vit", "cls"),
    "DeiTForImageClassification": ("deit", "cls"),
    "DeiTForImageClassificationWithTeacher": ("deit", "distilled"),
    "Dinov2ForImageClassification": ("dinov2", "cls_and_mean"),
    "Dinov2WithRegistersForImageClassification": ("dinov2_with_registers", "cls_and_mean"),
}


def _hf_vit(hf: nn.Module, hw: tuple[int, int]) -> _Transformer | str:
    """Hugging Face ViT, DeiT (with or without the teacher head) and DINOv2 (with or
    without registers) image classifiers."""
    from visattn.tokens import token_layout

    kind = _HF_HEADS.get(type(hf).__name__)
    if kind is None:
        return f"{type(hf).__name__} is not one of the Hugging Face classifiers it knows ({', '.join(_HF_HEADS)})"
    base = getattr(hf, kind[0])
    layers = base.layers if hasattr(base, "layers") else base.encoder.layer
    blocks = []
    for layer in layers:
        a, mlp = layer.attention, layer.mlp
        if not all(hasattr(mlp, n) for n in ("fc1", "fc2", "activation_fn")):
            return f"its MLP is {type(mlp).__name__}: gated MLPs have no LRP rule here"
        with torch.no_grad():  # the three projections as one, like timm's and torchvision's
            w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            b = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        norm1, norm2 = (layer.norm1, layer.norm2) if hasattr(layer, "norm1") else (layer.layernorm_before,
                                                                                  layer.layernorm_after)
        blocks.append(_Block(norm1, (w, b), a.q_proj.out_features // a.head_dim, a.scaling, a.o_proj, norm2, mlp.fc1,
                             mlp.activation_fn, mlp.fc2, ls1=getattr(layer, "layer_scale1", None),
                             ls2=getattr(layer, "layer_scale2", None)))
    layout = token_layout(base, hw)

    def readout(t: Tensor, ops: _Ops) -> Tensor:
        if kind[1] == "distilled":  # the average of the two heads, as at inference
            return (ops.linear(t[:, 0], hf.cls_classifier) + ops.linear(t[:, 1], hf.distillation_classifier)) / 2
        if kind[1] == "cls_and_mean":
            return ops.linear(torch.cat([t[:, 0], t[:, layout.prefix:].mean(1)], 1), hf.classifier)
        return ops.linear(t[:, 0], hf.classifier)

    return _Transformer(lambda images: base.embeddings(images), blocks, base.layernorm, readout, layout.grid,
                        layout.prefix)


def _as_transformer(model: nn.Module, hw: tuple[int, int]) -> _Transformer | str:
    """The model's blocks for transformer attribution (``hw``: the input's height and
    width), or the reason it does not apply."""
    from torchvision.models.vision_transformer import VisionTransformer

    from visattn.models.hybrid_vit import HybridViT
    from visattn.sources import HFClassifier

    if isinstance(model, HybridViT):
        return _hybrid(model)
    if isinstance(model, VisionTransformer):
        return _torchvision_vit(model)
    if isinstance(model, HFClassifier):
        return _hf_vit(model.model, hw)
    if type(model).__module__.startswith("timm."):
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        if isinstance(model, TimmViT):
            return _timm_vit(model, hw)
    return ("it is not a transformer whose blocks the LRP rules know (hybrid_vit, torchvision, timm and Hugging "
            "Face ViTs)")


def unsupported(model: nn.Module, hw: tuple[int, int]) -> str | None:
    """Why :func:`transformer_attribution` does not apply to ``model`` at input size ``hw``;
    None when it does.

    >>> from visattn import create_model
    >>> unsupported(create_model("hybrid_vit"), (32, 32)) is None
    True
    >>> unsupported(create_model("sa_cnn"), (32, 32))
    'it is not a transformer whose blocks the LRP rules know (hybrid_vit, torchvision, timm and Hugging Face ViTs)'
    """
    spec = _as_transformer(model, hw)
    return spec if isinstance(spec, str) else None


def transformer_attribution(model: nn.Module, images: Tensor,
                            targets: Tensor | list[int] | int | None = None) -> TokenRelevance | None:
    """Transformer attribution (Chefer et al., CVPR 2021) for a batch; None for a model
    whose blocks it does not know (see the module docstring). One forward through the
    transformer blocks, autograd of it for ∇A, and the LRP pass for R_A written out on its values.

    >>> from visattn import create_model
    >>> r = transformer_attribution(create_model("hybrid_vit", depth=2).eval(), torch.rand(2, 3, 32, 32))
    >>> r.maps().shape, bool((r.conservation < 0.01).all())
    ((2, 8, 8), True)
    """
    spec = _as_transformer(model, tuple(images.shape[-2:]))
    if isinstance(spec, str):
        return None
    with torch.no_grad():
        x = spec.embed(images.detach())
    notes: list[dict[str, Tensor]] = []
    with torch.enable_grad():
        logits, final, plain = spec.forward(x.clone().requires_grad_(), _Ops(lrp=False, notes=notes))
        t = _targets(logits, targets)
        grads = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), plain)
        final = final.detach().requires_grad_()  # the readout's LRP pass, then the blocks' written out
        chosen = spec.readout(_Ops(lrp=True).identity_rule(spec.norm, final), _Ops(lrp=True)).gather(1, t[:, None])[:, 0]
        (g,) = torch.autograd.grad(chosen.sum(), final)
    with torch.no_grad():
        final_relevance = (final * g).sum(-1).float()
        relevance = []
        for block, v in zip(reversed(spec.blocks), reversed(notes)):
            g, g_a = block.relprop({k: val.detach() for k, val in v.items()}, g)
            relevance.append(g_a)
        scale = _safe_div(torch.ones_like(chosen), chosen)[:, None, None, None]  # seed 1 at the target
        b, n = x.shape[:2]
        joint = torch.eye(n).expand(b, n, n)
        for v, grad, r in zip(notes, grads, reversed(relevance)):
            cam = (grad * (v["a"].detach() * r * scale)).clamp(min=0).mean(1).float()  # (B, N, N)
            joint = joint + cam @ joint
        inputs = (x * g).sum(dim=(1, 2))
        conservation = ((inputs - chosen).abs() / chosen.abs().clamp_min(1e-12)).cpu().numpy()
    return TokenRelevance(_readout(joint, final_relevance, spec.prefix), spec.grid, spec.prefix, t.tolist(),
                          conservation)
