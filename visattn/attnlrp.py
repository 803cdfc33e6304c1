"""AttnLRP (Achtibat et al., ICML 2024) for torchvision Vision Transformers, through lxt 2.1.

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

Supported: every torchvision ``VisionTransformer`` whose modules are all of the kinds lxt's
map and LRP-0 cover (:func:`supports`); lxt 2.1 has no map for timm or Hugging Face ViTs or
for this project's hybrid_vit, so :func:`attnlrp` returns None for them.

Relevance of a patch: the input pixels' relevance summed over channels and over the patch.
Conservation: ``|Σ relevance − logit| / |logit|`` per image, Σ over all input pixels. The
rules conserve relevance layer by layer except for what the additive terms keep (biases,
class token, position embedding): input relevance plus theirs equals the logit to float
precision, so the figure is the share of the logit that the additive terms absorb (0 for
a model without them).
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


def _rules() -> dict[type, type] | None:
    """``{torch module class: private subclass whose forward is lxt's rule}`` (None without lxt)."""
    global _RULES
    with _LOAD_GUARD:
        if _RULES is None:
            patches = _lxt_patches()
            if patches is None:
                return None

            def rule(cls: type, forward) -> type:
                return type(f"LXT{cls.__name__}", (cls,), {"forward": forward, "original_forward": cls.forward,
                                                           "__module__": __name__})

            _RULES = {nn.GELU: rule(nn.GELU, patches.non_linear_forward),
                      nn.Tanh: rule(nn.Tanh, patches.non_linear_forward),  # ViT pre-logits (representation_size)
                      nn.LayerNorm: rule(nn.LayerNorm, patches.layer_norm_forward),
                      nn.MultiheadAttention: rule(nn.MultiheadAttention, patches.cp_multi_head_attention_forward)}
        return _RULES


def _linear_kinds() -> tuple[type, ...]:
    """Modules that LRP-0 (Gradient×Input) covers as they are: linear or piecewise linear in eval mode."""
    from torchvision.models.vision_transformer import Encoder, EncoderBlock, MLPBlock
    from torchvision.ops.misc import Conv2dNormActivation

    return (Encoder, EncoderBlock, MLPBlock, Conv2dNormActivation, nn.Sequential, nn.Linear,
            nn.modules.linear.NonDynamicallyQuantizableLinear, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Dropout,
            nn.Identity)


def supports(model: nn.Module) -> bool:
    """Whether AttnLRP applies: a torchvision ``VisionTransformer`` made only of modules whose
    class lxt's ViT map patches (GELU, Tanh, LayerNorm, MultiheadAttention) or LRP-0 covers."""
    from torchvision.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        return False
    known = set(_linear_kinds()) | {nn.GELU, nn.Tanh, nn.LayerNorm, nn.MultiheadAttention}
    return all(type(m) in known for m in model.modules() if m is not model)


def _copy(module: nn.Module, rules: dict[type, type]) -> nn.Module:
    clone = copy.copy(module)  # same parameters and buffers; its own child table, class and (no) hooks
    clone._modules = {name: None if child is None else _copy(child, rules) for name, child in module._modules.items()}
    clone.__dict__.update({k: type(v)() for k, v in vars(module).items() if "_hooks" in k and isinstance(v, dict)})
    clone.__class__ = rules.get(type(module), type(module))
    clone.training = False
    return clone


def lrp_view(model: nn.Module) -> nn.Module | None:
    """A private copy of ``model`` (new module objects without hooks, the same parameter
    tensors, eval mode) that computes the same logits with lxt's rules as its gradients;
    None when lxt is missing or the model is not supported (:func:`supports`)."""
    rules = _rules()
    if rules is None or not supports(model):
        return None
    with model_lock(model):
        return _copy(model, rules)


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
    b, side, p = len(x), model.image_size // model.patch_size, model.patch_size
    tokens = pixels.reshape(b, side, p, side, p).sum(dim=(2, 4)).reshape(b, side * side).float()
    chosen = chosen.detach()
    conservation = (pixels.sum(dim=(1, 2)) - chosen).abs() / chosen.abs().clamp_min(1e-12)
    return TokenRelevance(tokens, (side, side), 0, t.tolist(), conservation.float().cpu().numpy())
