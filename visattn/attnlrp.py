"""AttnLRP (Achtibat et al., ICML 2024) for Vision Transformers, through lxt 2.1's rules.

lxt's map for torchvision's ViT (``lxt.efficient.models.vit_torch.cp_LRP``) applies its
rules as modified gradients, so that ``x ⊙ ∂logit/∂x`` is the LRP relevance of ``x``:
the identity rule through GELU (``non_linear_forward``), LayerNorm with its standard
deviation held constant (``layer_norm_forward``), CP-LRP inside attention (no relevance
through the softmax: queries and keys held constant, ``cp_multi_head_attention_forward``)
and plain Gradient×Input (LRP-0) on linear layers. The same is done here with lxt's own
functions, with one difference in how they are applied: ``lxt.efficient.monkey_patch``
replaces ``forward`` of ``torch.nn.GELU``, ``LayerNorm`` and ``MultiheadAttention`` for the
whole process; here they are the ``forward`` of private subclasses set on a private
structural copy of the model (new module objects sharing the same parameter tensors,
built under :func:`visattn.layers.model_lock`). The shared model, ``torch.nn`` and other
threads never see them; no parameter ``.grad`` is written.

Supported (:func:`supports`): torchvision's ``VisionTransformer`` (lxt's own map), and, with
the same rules, timm's ``VisionTransformer`` (token or average pooling; registers,
distillation token, q/k norm, LayerScale) and hybrid_vit, whose attention computes queries
and keys with one fused ``qkv`` layer: CP-LRP holds that layer's query and key parts
constant, as lxt holds ``nn.MultiheadAttention``'s, and hybrid_vit's softmax pooling
weights too. Anything else (Hugging Face models, other timm blocks or pools, CNNs) gets None.

Relevance of a patch: the input pixels' relevance summed over channels and over the pixels
of its grid cell. Conservation: ``|Σ relevance − logit| / |logit|`` per image, Σ over all
input pixels. The rules conserve relevance layer by layer except for what the additive
terms keep (biases, class and register tokens, position embedding): input relevance plus
theirs equals the logit to float precision, so the figure is the share of the logit that
the additive terms absorb (0 for a model without them).
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from visattn.layers import model_lock
from visattn.relevance import TokenRelevance, _targets

_LOAD_GUARD = threading.Lock()
_RULES: dict[type, type] | None = None


def _lxt_patches() -> ModuleType | None:
    """``lxt.efficient.patches``, or None without lxt. ``import lxt.efficient`` fails with
    transformers 5 (its BERT map imports ``find_pruneable_heads_and_indices``, since
    removed), so unless it already imported, ``patches`` is imported under a bare parent
    package that is removed again: lxt's own functions, none of its model maps."""
    try:
        import lxt
    except ImportError:
        return None
    if "lxt.efficient" in sys.modules:
        return importlib.import_module("lxt.efficient.patches")
    folder = Path(lxt.__file__).parent / "efficient"
    spec = importlib.util.spec_from_file_location("lxt.efficient", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    sys.modules["lxt.efficient"] = importlib.util.module_from_spec(spec)
    try:
        return importlib.import_module("lxt.efficient.patches")
    finally:
        del sys.modules["lxt.efficient"]


def _rule_class(cls: type, forward) -> type:
    return type(f"LXT{cls.__name__}", (cls,), {"forward": forward, "original_forward": cls.forward,
                                               "__module__": __name__})


def _rules() -> dict[type, type] | None:
    """``{torch module class: private subclass whose forward is lxt's rule}`` (None without lxt)."""
    global _RULES
    with _LOAD_GUARD:
        if _RULES is None:
            patches = _lxt_patches()
            if patches is None:
                return None
            _RULES = {nn.GELU: _rule_class(nn.GELU, patches.non_linear_forward),
                      nn.Tanh: _rule_class(nn.Tanh, patches.non_linear_forward),  # torchvision pre-logits
                      nn.LayerNorm: _rule_class(nn.LayerNorm, patches.layer_norm_forward),
                      nn.MultiheadAttention: _rule_class(nn.MultiheadAttention, patches.cp_multi_head_attention_forward)}
        return _RULES


class _HeldQK(nn.Module):
    """A fused ``qkv`` projection ([queries | keys | values] on the last axis) whose query and
    key parts carry no relevance: CP-LRP's rule (lxt's ``stop_gradient``), as lxt applies it
    to ``nn.MultiheadAttention``'s query and key."""

    def __init__(self, qkv: nn.Module) -> None:
        super().__init__()
        self.qkv = qkv

    def forward(self, x: Tensor) -> Tensor:
        y = self.qkv(x)
        c = y.shape[-1] // 3
        return torch.cat([y[..., : 2 * c].detach(), y[..., 2 * c :]], dim=-1)


class _Held(nn.Module):
    """A module whose output carries no relevance (the scores of hybrid_vit's softmax pooling:
    the pooling weights held constant, as CP-LRP holds attention weights)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x).detach()


FAMILIES = "torchvision and timm ViTs and hybrid_vit"  # what lxt's rules are applied to here


def _kinds(model: nn.Module) -> tuple[set[type], set[type]] | None:
    """(module classes allowed in ``model``, attention classes with a fused ``qkv``) for a
    family lxt's rules cover; None for any other model."""
    from torchvision.models.vision_transformer import Encoder, EncoderBlock, MLPBlock, VisionTransformer
    from torchvision.ops.misc import Conv2dNormActivation

    from visattn.models.attention import TokenSelfAttention
    from visattn.models.hybrid_vit import Block, HybridViT

    linear = {nn.Sequential, nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear, nn.Conv2d,
              nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Dropout, nn.Identity, nn.GELU, nn.Tanh, nn.LayerNorm}
    if isinstance(model, VisionTransformer):
        return linear | {Encoder, EncoderBlock, MLPBlock, Conv2dNormActivation, nn.MultiheadAttention}, set()
    if isinstance(model, HybridViT):
        return linear | {Block, TokenSelfAttention}, {TokenSelfAttention}
    timm = sys.modules.get("timm")
    if timm is not None and isinstance(model, timm.models.vision_transformer.VisionTransformer):
        from timm.layers import Attention, DropPath, LayerNorm, LayerScale, Mlp, PatchDropout, PatchEmbed
        from timm.models.vision_transformer import Block as TimmBlock

        return linear | {TimmBlock, Attention, Mlp, PatchEmbed, LayerScale, DropPath, PatchDropout, LayerNorm}, {Attention}
    return None


def unsupported(model: nn.Module) -> str | None:
    """Why AttnLRP does not apply to ``model``, as a clause; None when it does: a torchvision
    or timm ``VisionTransformer`` or hybrid_vit, made only of modules that lxt's rules or
    LRP-0 cover (no other block, pooling or activation), with lxt installed.

    >>> from visattn import create_model
    >>> unsupported(create_model("hybrid_vit", depth=1)) is None
    True
    >>> unsupported(create_model("sa_cnn"))
    "lxt's rules are applied to torchvision and timm ViTs and hybrid_vit, not to a SACNN"
    """
    kinds = _kinds(model)
    if kinds is None:
        hf = type(model).__module__.startswith("transformers.")
        return (f"lxt's rules are applied to {FAMILIES}, not to a {type(model).__name__}"
                + (" (lxt patches Hugging Face models process-wide, which a shared server cannot allow)" if hf else ""))
    for name, m in model.named_modules():
        if m is not model and type(m) not in kinds[0]:
            return f"its {name} ({type(m).__name__}) is a module that no LRP rule here covers"
        if type(m) in kinds[1] and not isinstance(m._modules.get("qkv"), nn.Linear):
            return f"its {name} has no fused query-key-value layer to hold"
    if _rules() is None:
        return "lxt is not installed (pip install lxt==2.1)"
    return None


def supports(model: nn.Module) -> bool:
    """Whether AttnLRP applies to ``model`` (:func:`unsupported` gives the reason when not)."""
    return unsupported(model) is None


def _copy(module: nn.Module, rules: dict[type, type], fused: set[type]) -> nn.Module:
    clone = copy.copy(module)  # same parameters and buffers; its own child table, class and (no) hooks
    clone._modules = {name: None if child is None else _copy(child, rules, fused)
                      for name, child in module._modules.items()}
    clone.__dict__.update({k: type(v)() for k, v in vars(module).items() if "_hooks" in k and isinstance(v, dict)})
    if isinstance(module, nn.LayerNorm) and type(module) not in rules:  # timm's LayerNorm subclass
        rules.setdefault(type(module), _rule_class(type(module), rules[nn.LayerNorm].forward))
    clone.__class__ = rules.get(type(module), type(module))
    if type(module) in fused:
        clone._modules["qkv"] = _HeldQK(clone._modules["qkv"])
    clone.training = False
    return clone


def lrp_view(model: nn.Module) -> nn.Module | None:
    """A private copy of ``model`` (new module objects without hooks, the same parameter
    tensors, eval mode) that computes the same logits with lxt's rules as its gradients;
    None when lxt is missing or the model is not supported (:func:`supports`)."""
    if not supports(model):
        return None
    rules = _rules()
    with model_lock(model):
        view = _copy(model, rules, _kinds(model)[1])
    if isinstance(getattr(view, "pool", None), nn.Linear):  # hybrid_vit's softmax pooling
        view._modules["pool"] = _Held(view._modules["pool"])
    return view


def _grid(model: nn.Module, hw: tuple[int, int]) -> tuple[int, int]:
    from visattn.tokens import token_layout

    layout = token_layout(model, hw)
    return layout.grid if layout is not None else tuple(model.blocks[0].attn.grid)  # hybrid_vit


def attnlrp(model: nn.Module, images: Tensor, targets: Tensor | list[int] | int | None = None) -> TokenRelevance | None:
    """AttnLRP relevance of each patch for each image's target class (None: its prediction),
    with its conservation figure; None for a model it does not support. One forward and one
    backward pass through a private copy of the model.

    >>> import torchvision
    >>> vit = torchvision.models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=10).eval()
    >>> r = attnlrp(vit, torch.rand(2, 3, 32, 32))
    >>> r.maps().shape, r.conservation.shape
    ((2, 4, 4), (2,))
    """
    view = lrp_view(model)
    if view is None:
        return None
    x = images.detach().clone().requires_grad_()
    with torch.enable_grad():
        logits = view(x)
        t = _targets(logits, targets)
        chosen = logits.gather(1, t[:, None])[:, 0]
        (grad,) = torch.autograd.grad(chosen.sum(), x)
    pixels = (x * grad).sum(1).detach()  # (B, H, W)
    (h, w), area = _grid(model, tuple(x.shape[-2:])), x.shape[-2] * x.shape[-1]
    tokens = (F.adaptive_avg_pool2d(pixels[:, None], (h, w))[:, 0] * (area / (h * w))).reshape(len(x), h * w).float()
    chosen = chosen.detach()
    conservation = (pixels.sum(dim=(1, 2)) - chosen).abs() / chosen.abs().clamp_min(1e-12)
    return TokenRelevance(tokens, (h, w), 0, t.tolist(), conservation.float().cpu().numpy())
