"""Attribution maps beside the attention maps: Grad-CAM, integrated gradients, saliency,
occlusion (captum), raw attention, rollout, the transformer relevance of
:mod:`visattn.relevance` (GAE, transformer attribution), AttnLRP through lxt
(:mod:`visattn.attnlrp`) and the CAM family of :mod:`visattn.cams`. Each method takes a batch (B, 3, H, W) (or one image, (3, H, W)) and
returns an :class:`Explanation`: B non-negative float32 (H, W) maps at input resolution, raw
scale (``visattn.maps.normalise`` them for display); image i's map is the one it gets alone.

:data:`METHODS` is the one table of them (name, label, function, slow or not, takes a
layer or not) that the Compare page, the CLI, ``visattn.faithfulness`` and the benchmarks
read: a new method is a function here and one row there.

Concurrency: gradient methods hold a lock per model (:func:`visattn.layers.model_lock`), so two threads
never interleave hooks on one shared model; Grad-CAM's hook goes on a private view (new
module objects along the path to the layer, everything else shared), so plain forwards
and captures from other threads never meet it. Nothing calls ``model.train()``: gradients are taken under
``torch.enable_grad`` with respect to a copy of the input only (no parameter ``.grad``),
and the ``training`` / ``requires_grad`` flags are restored on the way out.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion, Saliency
from torch import Tensor, nn
from torch.nn import functional as F

from visattn.errors import ExplainError
from visattn.layers import default_cam_layer, list_cam_layers  # noqa: F401 (Grad-CAM's layers, for callers)
from visattn.layers import held, layer_name, probed_view
from visattn.sites import AttentionSite
from visattn.tracing import capture


@dataclass
class Explanation:
    """Attribution maps of a batch: ``maps`` is (B, H, W) float32, non-negative, at input
    resolution; ``targets`` the class explained in each image; ``seconds`` for the whole batch.
    ``e[i]`` is image i's explanation; ``map`` and ``target`` read the only image of a
    one-image explanation. ``conservation``: for LRP methods, (B,) |Σ input relevance − logit| / |logit|."""

    name: str
    maps: np.ndarray
    targets: list[int]
    seconds: float
    conservation: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, i: int) -> Explanation:
        i = range(len(self))[i]
        kept = None if self.conservation is None else self.conservation[i : i + 1]
        return Explanation(self.name, self.maps[i : i + 1], self.targets[i : i + 1], self.seconds / len(self), kept)

    def _single(self) -> None:
        if len(self) != 1:
            raise ExplainError(f"this explanation holds {len(self)} maps: take one image's with e[i], or read .maps")

    @property
    def map(self) -> np.ndarray:
        """The (H, W) map of a one-image explanation."""
        self._single()
        return self.maps[0]

    @property
    def target(self) -> int:
        """The class explained in a one-image explanation."""
        self._single()
        return self.targets[0]

    @property
    def constant(self) -> bool:
        """True when the (one-image) map holds one value: nothing to draw (say so instead of a flat colour)."""
        m = self.map
        return bool(m.size == 0 or float(m.max()) - float(m.min()) <= 1e-12)


#: the class(es) explained: one for every image, one per image, or None (each image's prediction)
Targets = int | Sequence[int] | Tensor | None


def _prepare(model: nn.Module, images: Tensor) -> Tensor:
    """A detached float copy of ``images`` as (B, 3, H, W) on the model's device (one
    (3, H, W) image becomes a batch of one)."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[0] == 0:
        raise ExplainError(f"expected images (B, C, H, W) or one image (C, H, W), got shape {tuple(images.shape)}")
    device = next(model.parameters(), images).device
    return images.detach().to(device=device, dtype=torch.float32).clone().requires_grad_()


def _targets(model: nn.Module, x: Tensor, target: Targets) -> Tensor:
    """The class explained in each image of ``x``, as a (B,) long tensor."""
    if target is None:
        with torch.no_grad():
            return model(x).argmax(dim=1)
    t = torch.as_tensor(target, device=x.device).long().reshape(-1)
    if len(t) not in (1, len(x)):
        raise ExplainError(f"{len(t)} targets for {len(x)} images: give one class, or one per image")
    return t.expand(len(x))


def _explanation(name: str, attr: Tensor, targets: Tensor | list[int], t0: float,
                 conservation: np.ndarray | None = None) -> Explanation:
    """Wrap a (B, H, W) tensor as finite, non-negative float32 maps."""
    m = torch.nan_to_num(attr.detach().float().clamp(min=0)).cpu().numpy().astype(np.float32)
    return Explanation(name=name, maps=m, targets=[int(t) for t in targets],
                       seconds=max(time.perf_counter() - t0, 1e-9), conservation=conservation)


def _gradient_method(name: str, model: nn.Module, images: Tensor, target: Targets,
                     attribute: Callable[[Tensor, Tensor], Tensor],
                     reduce: Callable[[Tensor], Tensor]) -> Explanation:
    """Run a captum ``attribute(x, targets)`` holding the model's lock with gradients on,
    restore the model's training/requires_grad flags, ``reduce`` (B, C, H, W) to (B, H, W)."""
    t0, x = time.perf_counter(), _prepare(model, images)
    with held(model), torch.enable_grad():
        targets = _targets(model, x, target)
        attr = attribute(x, targets)
    return _explanation(name, reduce(attr), targets, t0)


def grad_cam(model: nn.Module, images: Tensor, target: Targets = None,
             layer: nn.Module | str | None = None) -> Explanation:
    """Grad-CAM (Selvaraju et al. 2017): captum ``LayerGradCam``, ReLU, bilinear upsampling.

    Args:
        model: a classifier (in eval mode). images: (B, 3, H, W), or one image (3, H, W).
        target: the class explained: one for all images, one per image, or None (each
            image's predicted class).
        layer: a module or a name from :func:`list_cam_layers`; None: :func:`default_cam_layer`.
            A transformer block is explained by the grid tokens entering it.

    >>> grad_cam(model, image, target=3, layer="stages.1").map.shape
    (32, 32)
    >>> grad_cam(model, torch.cat([image, image]), target=[3, 5]).maps.shape
    (2, 32, 32)
    """
    name = layer_name(model, layer)

    def attribute(x: Tensor, t: Tensor) -> Tensor:
        view = probed_view(model, name, (int(x.shape[-2]), int(x.shape[-1])))
        attr = LayerGradCam(*view).attribute(x, target=t, relu_attributions=True)
        return LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")

    return _gradient_method("grad_cam", model, images, target, attribute, lambda a: a.sum(1))


def integrated_gradients(model: nn.Module, images: Tensor, target: Targets = None, steps: int = 50,
                         internal_batch_size: int = 25, baseline: Tensor | None = None) -> Explanation:
    """Integrated gradients (Sundararajan et al. 2017); map = |attribution| summed over channels.

    Args:
        model, images, target: as for :func:`grad_cam`. steps: points on the path.
        internal_batch_size: path points per forward. baseline: (1, 3, H, W); None: black.

    >>> bool(integrated_gradients(model, image, target=3, steps=32).map.min() >= 0)
    True
    """
    def attribute(x: Tensor, t: Tensor) -> Tensor:
        base = torch.zeros_like(x) if baseline is None else baseline.to(x).expand_as(x)
        return IntegratedGradients(model).attribute(
            x, baselines=base, target=t, n_steps=steps, internal_batch_size=internal_batch_size)

    return _gradient_method("integrated_gradients", model, images, target, attribute, lambda a: a.abs().sum(1))


def saliency(model: nn.Module, images: Tensor, target: Targets = None) -> Explanation:
    """Gradient saliency (Simonyan et al. 2014): max over channels of |d logit / d pixel|.

    Args:
        model, images, target: as for :func:`grad_cam`.

    >>> saliency(model, image, target=3).map.shape
    (32, 32)
    """
    return _gradient_method("saliency", model, images, target,
                            lambda x, t: Saliency(model).attribute(x, target=t, abs=True), lambda a: a.amax(1))


def occlusion(model: nn.Module, images: Tensor, target: Targets = None, window: int | None = None,
              stride: int | None = None, perturbations_per_eval: int = 64) -> Explanation:
    """Occlusion (Zeiler & Fergus 2014): the drop of the target logit when a zero
    (3, window, window) patch covers each pixel, ReLU'd. Batched, without gradients:
    about ((H - window) / stride + 1)² / perturbations_per_eval forwards.

    Args:
        model, images, target: as for :func:`grad_cam`. window, stride: patch side and step;
            None: they grow with the image, about 15×15 positions whatever its size
            (4 and 2 at 32 px). perturbations_per_eval: occluded images per forward (a
            batch of B takes B of them per occluding position).

    >>> occlusion(model, image, target=3, window=8, stride=4).map.shape
    (32, 32)
    """
    side = int(images.shape[-1])
    window = max(4, side // 8) if window is None else window
    stride = max(2, side // 16) if stride is None else stride

    def attribute(x: Tensor, t: Tensor) -> Tensor:
        c = x.shape[1]
        return Occlusion(model).attribute(
            x, sliding_window_shapes=(c, window, window), strides=(c, stride, stride), target=t,
            baselines=0.0, perturbations_per_eval=max(1, perturbations_per_eval // len(x)))

    return _gradient_method("occlusion", model, images, target, attribute, lambda a: a.mean(1))


def _upsampled(grids: np.ndarray | Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (B, h, w) token maps to (B, *size), as :func:`visattn.maps.upsample` does one."""
    t = torch.as_tensor(np.asarray(grids, dtype=np.float32))[:, None]
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def _from_trace(name: str, model: nn.Module, images: Tensor, target: Targets,
                map_of: Callable[[list[AttentionSite], int], np.ndarray]) -> Explanation | None:
    """Capture once, build each image's token-grid map ``map_of(sites, b)``, upsample them."""
    t0, x = time.perf_counter(), _prepare(model, images).detach()
    trace = capture(model, x)
    sites = list(trace.attention.values())
    if not sites:
        return None
    grids = np.stack([np.asarray(map_of(sites, b), dtype=np.float32) for b in range(len(x))])
    targets = trace.logits.argmax(1) if target is None else _targets(model, x, target)
    return _explanation(name, _upsampled(grids, tuple(x.shape[-2:])), targets, t0)


def attention_map(model: nn.Module, images: Tensor, target: Targets = None,
                  layer: str | None = None) -> Explanation | None:
    """Attention received by each grid token at one attention site (``layer``, a name
    from the model's trace; None: the last one): weights averaged over heads and over
    grid queries, upsampled. None if the model has no attention site. ``target`` is only
    recorded (attention does not depend on the class).

    >>> attention_map(create_model("sa_cnn").eval(), torch.rand(1, 3, 32, 32)).map.shape
    (32, 32)
    """
    from visattn.maps import received_attention

    def at_layer(sites: list[AttentionSite], b: int) -> np.ndarray:
        site = sites[-1] if layer is None else next((s for s in sites if s.name == layer), None)
        if site is None:
            raise ExplainError(f"no attention layer {layer!r}; the model has {[s.name for s in sites]}")
        return received_attention(site, b).mean(0)

    return _from_trace("attention", model, images, target, at_layer)


def attention_layers(model: nn.Module, image: Tensor) -> list[str]:
    """Names of the model's attention sites, in forward order (empty without attention)."""
    return list(capture(model, _prepare(model, image[:1] if image.dim() == 4 else image).detach()).attention)


def rollout(model: nn.Module, images: Tensor, target: Targets = None,
            head_fusion: str = "mean") -> Explanation | None:
    """Attention rollout (Abnar & Zuidema 2020) via ``visattn.maps.rollout_map``, upsampled.
    ``head_fusion``: "mean", "max" or "min". None if the model has no attention site.

    >>> rollout(create_model("hybrid_vit").eval(), torch.rand(1, 3, 32, 32), head_fusion="max").name
    'rollout'
    """
    from visattn.maps import rollout_map

    return _from_trace("rollout", model, images, target, lambda sites, b: rollout_map(sites, b, head_fusion))


def _relevance(name: str, model: nn.Module, images: Tensor, target: Targets) -> Explanation | None:
    """A token-relevance method (:mod:`visattn.relevance`, :mod:`visattn.attnlrp`) on a
    batch, its grid maps upsampled, its conservation figure kept."""
    from visattn import attnlrp, relevance

    fn = attnlrp.attnlrp if name == "attnlrp" else getattr(relevance, name)
    t0, x = time.perf_counter(), _prepare(model, images).detach()
    r = fn(model, x, None if target is None else _targets(model, x, target))
    if r is None:
        return None
    return _explanation(name, _upsampled(r.maps(), tuple(x.shape[-2:])), r.targets, t0, r.conservation)


def gae(model: nn.Module, images: Tensor, target: Targets = None) -> Explanation | None:
    """Generic attention explainability, gradient-weighted rollout (Chefer et al., ICCV 2021):
    :func:`visattn.relevance.gae`, upsampled. None if the model has no attention site.

    >>> from visattn import create_model
    >>> gae(create_model("hybrid_vit").eval(), torch.rand(1, 3, 32, 32), target=3).map.shape
    (32, 32)
    """
    return _relevance("gae", model, images, target)


def transformer_attribution(model: nn.Module, images: Tensor, target: Targets = None) -> Explanation | None:
    """Transformer attribution, LRP-weighted (Chefer et al., CVPR 2021):
    :func:`visattn.relevance.transformer_attribution`, upsampled. None for models whose
    transformer blocks it does not know (hybrid_vit, torchvision, timm and Hugging Face ViTs
    are known; :func:`visattn.relevance.unsupported` says why not).

    >>> from visattn import create_model
    >>> transformer_attribution(create_model("hybrid_vit").eval(), torch.rand(1, 3, 32, 32)).map.shape
    (32, 32)
    """
    return _relevance("transformer_attribution", model, images, target)


def attnlrp(model: nn.Module, images: Tensor, target: Targets = None) -> Explanation | None:
    """AttnLRP through lxt (Achtibat et al., ICML 2024): :func:`visattn.attnlrp.attnlrp`,
    patch relevance upsampled, ``conservation`` = |Σ relevance − logit| / |logit| per image.
    None for a model it does not support (:func:`visattn.attnlrp.supports`: torchvision and
    timm ViTs, hybrid_vit).

    >>> import torchvision
    >>> vit = torchvision.models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=10).eval()
    >>> e = attnlrp(vit, torch.rand(1, 3, 32, 32))
    >>> e.map.shape, e.conservation.shape, attnlrp(create_model("sa_cnn").eval(), torch.rand(1, 3, 32, 32))
    ((32, 32), (1,), None)
    """
    return _relevance("attnlrp", model, images, target)


@dataclass(frozen=True)
class Method:
    """One row of :data:`METHODS`. Calling it runs ``fn(model, images, target, **options)``."""

    name: str
    label: str  # what the dashboard and figures call it
    fn: Callable[..., Explanation | None]
    slow: bool = False  # seconds per image on a CPU even at 32 px (not drawn at once for large models)
    takes_layer: bool = False  # ``fn`` accepts ``layer=`` (a module name)
    needs_attention: bool = False  # None on a model without self-attention

    def __call__(self, model: nn.Module, images: Tensor, target: Targets = None,
                 **options) -> Explanation | None:
        return self.fn(model, images, target, **options)


def _cam(method: str) -> Callable[..., Explanation]:
    """The explanation function of a :mod:`visattn.cams` method."""
    def explain_cam(model: nn.Module, images: Tensor, target: Targets = None,
                    layer: nn.Module | str | None = None) -> Explanation:
        from visattn.cams import cam_maps

        t0, x = time.perf_counter(), _prepare(model, images).detach()
        maps, targets = cam_maps(method, model, x, None if target is None else _targets(model, x, target), layer)
        return _explanation(method, torch.as_tensor(maps), targets, t0)

    explain_cam.__name__ = explain_cam.__qualname__ = method
    explain_cam.__doc__ = f"{method} through pytorch-grad-cam: see :func:`visattn.cams.cam_maps`."
    return explain_cam


#: Every explanation method, in the order the dashboard shows them.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("attention", "Attention (received)", attention_map, takes_layer=True, needs_attention=True),
    Method("rollout", "Attention rollout", rollout, needs_attention=True),
    Method("gae", "GAE (gradient-weighted rollout)", gae, needs_attention=True),
    Method("transformer_attribution", "Transformer attribution", transformer_attribution, needs_attention=True),
    Method("attnlrp", "AttnLRP (lxt)", attnlrp, needs_attention=True),
    Method("grad_cam", "Grad-CAM", grad_cam, takes_layer=True),
    Method("integrated_gradients", "Integrated gradients", integrated_gradients, slow=True),
    Method("saliency", "Saliency", saliency),
    Method("occlusion", "Occlusion", occlusion, slow=True),
    Method("score_cam", "Score-CAM", _cam("score_cam"), slow=True, takes_layer=True),
    Method("grad_cam_plus_plus", "Grad-CAM++", _cam("grad_cam_plus_plus"), takes_layer=True),
    Method("xgrad_cam", "XGrad-CAM", _cam("xgrad_cam"), takes_layer=True),
    Method("layer_cam", "LayerCAM", _cam("layer_cam"), takes_layer=True),
    Method("hires_cam", "HiRes-CAM", _cam("hires_cam"), takes_layer=True),
    Method("eigen_cam", "Eigen-CAM", _cam("eigen_cam"), takes_layer=True),
)}


def why_unavailable(model: nn.Module, images: Tensor, name: str, has_attention: bool) -> str | None:
    """Why method ``name`` gave no map for ``model`` on ``images`` (B, 3, H, W), as a clause for
    "not available for this model: ..."; None when there is nothing more specific to say.

    >>> from visattn.models import create_model
    >>> why_unavailable(create_model("sa_cnn"), torch.zeros(1, 3, 32, 32), "rollout", False)
    'it has no self-attention layers'
    >>> why_unavailable(create_model("sa_cnn"), torch.zeros(1, 3, 32, 32), "attnlrp", True)
    "lxt's rules are applied to torchvision and timm ViTs and hybrid_vit, not to a SACNN"
    """
    from visattn.attnlrp import unsupported as lrp_unsupported
    from visattn.relevance import unsupported

    if not has_attention:
        return "it has no self-attention layers"
    if name == "transformer_attribution":
        return unsupported(model, tuple(images.shape[-2:]))
    if name == "attnlrp":
        return lrp_unsupported(model)
    return None


def method(name: str) -> Method:
    """The row of :data:`METHODS` called ``name``; one :class:`ExplainError` line otherwise.

    >>> method("grad_cam").label, method("occlusion").slow
    ('Grad-CAM', True)
    """
    if name not in METHODS:
        raise ExplainError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def explain_all(model: nn.Module, images: Tensor, target: Targets = None,
                methods: tuple[str, ...] | None = None) -> dict[str, Explanation]:
    """Run several methods (None: all of :data:`METHODS`) on the same images and targets
    (None: each image's predicted class). Methods that do not apply (attention maps of a
    model without attention) are left out.

    >>> sorted(explain_all(model, image, methods=("saliency", "grad_cam")))
    ['grad_cam', 'saliency']
    """
    methods = tuple(METHODS) if methods is None else methods
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ExplainError(f"unknown methods {unknown}; known: {list(METHODS)}")
    target = _targets(model, _prepare(model, images), target)
    results = {name: METHODS[name](model, images, target) for name in methods}
    return {name: e for name, e in results.items() if e is not None}
