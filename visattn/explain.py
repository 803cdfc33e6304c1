"""Attribution maps beside the attention maps: Grad-CAM, integrated gradients, saliency,
occlusion (captum), raw attention, rollout, and the transformer relevance of
:mod:`visattn.relevance` (GAE, transformer attribution). Each method takes one image (1, 3, H, W)
and returns an :class:`Explanation`: a non-negative float32 (H, W) map at input
resolution, raw scale (``visattn.maps.normalise`` it for display).

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
from typing import Callable

import numpy as np
import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion, Saliency
from torch import Tensor, nn

from visattn.errors import ExplainError
from visattn.layers import default_cam_layer, list_cam_layers  # noqa: F401 (Grad-CAM's layers, for callers)
from visattn.layers import held, layer_name, probed_view
from visattn.sites import AttentionSite
from visattn.tracing import capture


@dataclass
class Explanation:
    """One attribution map: ``map`` is (H, W) float32, non-negative, at input resolution."""

    name: str
    map: np.ndarray
    target: int
    seconds: float

    @property
    def constant(self) -> bool:
        """True when the map holds one value: nothing to draw (say so instead of a flat colour)."""
        return bool(self.map.size == 0 or float(self.map.max()) - float(self.map.min()) <= 1e-12)


def _prepare(model: nn.Module, image: Tensor) -> Tensor:
    """A detached float copy of ``image`` as (1, 3, H, W) on the model's device."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ExplainError(f"expected one image (1, C, H, W), got shape {tuple(image.shape)}")
    device = next(model.parameters(), image).device
    return image.detach().to(device=device, dtype=torch.float32).clone().requires_grad_()


def _target(model: nn.Module, x: Tensor, target: int | None) -> int:
    if target is not None:
        return int(target)
    with torch.no_grad():
        return int(model(x).argmax(dim=1)[0])


def _explanation(name: str, attr: Tensor, target: int, t0: float) -> Explanation:
    """Wrap a (H, W) tensor as a finite, non-negative float32 map."""
    m = torch.nan_to_num(attr.detach().float().clamp(min=0)).cpu().numpy().astype(np.float32)
    return Explanation(name=name, map=m, target=target, seconds=max(time.perf_counter() - t0, 1e-9))


def _gradient_method(name: str, model: nn.Module, image: Tensor, target: int | None,
                     attribute: Callable[[Tensor, int], Tensor],
                     reduce: Callable[[Tensor], Tensor]) -> Explanation:
    """Run a captum ``attribute(x, target)`` holding the model's lock with gradients on,
    restore the model's training/requires_grad flags, ``reduce`` (C, H, W) to (H, W)."""
    t0, x = time.perf_counter(), _prepare(model, image)
    with held(model), torch.enable_grad():
        target = _target(model, x, target)
        attr = attribute(x, target)
    return _explanation(name, reduce(attr[0]), target, t0)


def grad_cam(model: nn.Module, image: Tensor, target: int | None = None,
             layer: nn.Module | str | None = None) -> Explanation:
    """Grad-CAM (Selvaraju et al. 2017): captum ``LayerGradCam``, ReLU, bilinear upsampling.

    Args:
        model: a classifier (in eval mode). image: (1, 3, H, W).
        target: the class explained; None: the predicted class.
        layer: a module or a name from :func:`list_cam_layers`; None: :func:`default_cam_layer`.
            A transformer block is explained by the grid tokens entering it.

    >>> grad_cam(model, image, target=3, layer="stages.1").map.shape
    (32, 32)
    """
    name = layer_name(model, layer)

    def attribute(x: Tensor, t: int) -> Tensor:
        view = probed_view(model, name, (int(x.shape[-2]), int(x.shape[-1])))
        attr = LayerGradCam(*view).attribute(x, target=t, relu_attributions=True)
        return LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")

    return _gradient_method("grad_cam", model, image, target, attribute, lambda a: a.sum(0))


def integrated_gradients(model: nn.Module, image: Tensor, target: int | None = None, steps: int = 50,
                         internal_batch_size: int = 25, baseline: Tensor | None = None) -> Explanation:
    """Integrated gradients (Sundararajan et al. 2017); map = |attribution| summed over channels.

    Args:
        model, image, target: as for :func:`grad_cam`. steps: points on the path.
        internal_batch_size: path points per forward. baseline: (1, 3, H, W); None: black.

    >>> bool(integrated_gradients(model, image, target=3, steps=32).map.min() >= 0)
    True
    """
    def attribute(x: Tensor, t: int) -> Tensor:
        base = torch.zeros_like(x) if baseline is None else baseline.to(x).expand_as(x)
        return IntegratedGradients(model).attribute(
            x, baselines=base, target=t, n_steps=steps, internal_batch_size=internal_batch_size)

    return _gradient_method("integrated_gradients", model, image, target, attribute, lambda a: a.abs().sum(0))


def saliency(model: nn.Module, image: Tensor, target: int | None = None) -> Explanation:
    """Gradient saliency (Simonyan et al. 2014): max over channels of |d logit / d pixel|.

    Args:
        model, image, target: as for :func:`grad_cam`.

    >>> saliency(model, image, target=3).map.shape
    (32, 32)
    """
    return _gradient_method("saliency", model, image, target,
                            lambda x, t: Saliency(model).attribute(x, target=t, abs=True), lambda a: a.amax(0))


def occlusion(model: nn.Module, image: Tensor, target: int | None = None, window: int | None = None,
              stride: int | None = None, perturbations_per_eval: int = 64) -> Explanation:
    """Occlusion (Zeiler & Fergus 2014): the drop of the target logit when a zero
    (3, window, window) patch covers each pixel, ReLU'd. Batched, without gradients:
    about ((H - window) / stride + 1)² / perturbations_per_eval forwards.

    Args:
        model, image, target: as for :func:`grad_cam`. window, stride: patch side and step;
            None: they grow with the image, about 15×15 positions whatever its size
            (4 and 2 at 32 px). perturbations_per_eval: occluded copies per forward.

    >>> occlusion(model, image, target=3, window=8, stride=4).map.shape
    (32, 32)
    """
    side = int(image.shape[-1])
    window = max(4, side // 8) if window is None else window
    stride = max(2, side // 16) if stride is None else stride

    def attribute(x: Tensor, t: int) -> Tensor:
        c = x.shape[1]
        return Occlusion(model).attribute(
            x, sliding_window_shapes=(c, window, window), strides=(c, stride, stride), target=t,
            baselines=0.0, perturbations_per_eval=perturbations_per_eval)

    return _gradient_method("occlusion", model, image, target, attribute, lambda a: a.mean(0))


def _from_trace(name: str, model: nn.Module, image: Tensor, target: int | None,
                map_of: Callable[[list[AttentionSite]], np.ndarray]) -> Explanation | None:
    """Capture once, build a token-grid map from the attention sites, upsample it."""
    from visattn.maps import upsample

    t0, x = time.perf_counter(), _prepare(model, image).detach()
    trace = capture(model, x)
    sites = list(trace.attention.values())
    if not sites:
        return None
    m = upsample(np.asarray(map_of(sites), dtype=np.float32), tuple(x.shape[-2:]))
    target = int(trace.logits.argmax(1)[0]) if target is None else int(target)
    return _explanation(name, torch.as_tensor(m), target, t0)


def _received(site: AttentionSite) -> np.ndarray:
    from visattn.maps import received_attention

    return received_attention(site, 0).mean(0)


def attention_map(model: nn.Module, image: Tensor, target: int | None = None,
                  layer: str | None = None) -> Explanation | None:
    """Attention received by each grid token at one attention site (``layer``, a name
    from the model's trace; None: the last one): weights averaged over heads and over
    grid queries, upsampled. None if the model has no attention site.

    >>> attention_map(create_model("sa_cnn").eval(), torch.rand(1, 3, 32, 32)).map.shape
    (32, 32)
    """
    def at_layer(sites: list[AttentionSite]) -> np.ndarray:
        site = sites[-1] if layer is None else next((s for s in sites if s.name == layer), None)
        if site is None:
            raise ExplainError(f"no attention layer {layer!r}; the model has {[s.name for s in sites]}")
        return _received(site)

    return _from_trace("attention", model, image, target, at_layer)


def attention_layers(model: nn.Module, image: Tensor) -> list[str]:
    """Names of the model's attention sites, in forward order (empty without attention)."""
    return list(capture(model, _prepare(model, image).detach()).attention)


def rollout(model: nn.Module, image: Tensor, target: int | None = None,
            head_fusion: str = "mean") -> Explanation | None:
    """Attention rollout (Abnar & Zuidema 2020) via ``visattn.maps.rollout_map``, upsampled.
    ``head_fusion``: "mean", "max" or "min". None if the model has no attention site.

    >>> rollout(create_model("hybrid_vit").eval(), torch.rand(1, 3, 32, 32), head_fusion="max").name
    'rollout'
    """
    from visattn.maps import rollout_map

    return _from_trace("rollout", model, image, target, lambda sites: rollout_map(sites, 0, head_fusion))


def _relevance(name: str, model: nn.Module, image: Tensor, target: int | None) -> Explanation | None:
    """A :mod:`visattn.relevance` method on one image, its grid map upsampled."""
    from visattn import relevance
    from visattn.maps import upsample

    t0, x = time.perf_counter(), _prepare(model, image).detach()
    r = getattr(relevance, name)(model, x, target)
    if r is None:
        return None
    return _explanation(name, torch.as_tensor(upsample(r.maps()[0], tuple(x.shape[-2:]))), r.targets[0], t0)


def gae(model: nn.Module, image: Tensor, target: int | None = None) -> Explanation | None:
    """Generic attention explainability, gradient-weighted rollout (Chefer et al., ICCV 2021):
    :func:`visattn.relevance.gae`, upsampled. None if the model has no attention site.

    >>> from visattn import create_model
    >>> gae(create_model("hybrid_vit").eval(), torch.rand(1, 3, 32, 32), target=3).map.shape
    (32, 32)
    """
    return _relevance("gae", model, image, target)


def transformer_attribution(model: nn.Module, image: Tensor, target: int | None = None) -> Explanation | None:
    """Transformer attribution, LRP-weighted (Chefer et al., CVPR 2021):
    :func:`visattn.relevance.transformer_attribution`, upsampled. None for models whose
    transformer blocks it does not know (hybrid_vit and torchvision ViTs are known).

    >>> from visattn import create_model
    >>> transformer_attribution(create_model("hybrid_vit").eval(), torch.rand(1, 3, 32, 32)).map.shape
    (32, 32)
    """
    return _relevance("transformer_attribution", model, image, target)


@dataclass(frozen=True)
class Method:
    """One row of :data:`METHODS`. Calling it runs ``fn(model, image, target, **options)``."""

    name: str
    label: str  # what the dashboard and figures call it
    fn: Callable[..., Explanation | None]
    slow: bool = False  # seconds per image on a CPU even at 32 px (not drawn at once for large models)
    takes_layer: bool = False  # ``fn`` accepts ``layer=`` (a module name)
    needs_attention: bool = False  # None on a model without self-attention

    def __call__(self, model: nn.Module, image: Tensor, target: int | None = None,
                 **options) -> Explanation | None:
        return self.fn(model, image, target, **options)


def _cam(method: str) -> Callable[..., Explanation]:
    """The per-image explanation function of a :mod:`visattn.cams` method."""
    def explain_cam(model: nn.Module, image: Tensor, target: int | None = None,
                    layer: nn.Module | str | None = None) -> Explanation:
        from visattn.cams import cam_maps

        t0, x = time.perf_counter(), _prepare(model, image).detach()
        maps, targets = cam_maps(method, model, x, target, layer)
        return _explanation(method, torch.as_tensor(maps[0]), targets[0], t0)

    explain_cam.__name__ = explain_cam.__qualname__ = method
    explain_cam.__doc__ = f"{method} through pytorch-grad-cam: see :func:`visattn.cams.cam_maps`."
    return explain_cam


#: Every explanation method, in the order the dashboard shows them.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("attention", "Attention (received)", attention_map, takes_layer=True, needs_attention=True),
    Method("rollout", "Attention rollout", rollout, needs_attention=True),
    Method("gae", "GAE (gradient-weighted rollout)", gae, needs_attention=True),
    Method("transformer_attribution", "Transformer attribution", transformer_attribution, needs_attention=True),
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


def method(name: str) -> Method:
    """The row of :data:`METHODS` called ``name``; one :class:`ExplainError` line otherwise.

    >>> method("grad_cam").label, method("occlusion").slow
    ('Grad-CAM', True)
    """
    if name not in METHODS:
        raise ExplainError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def explain_all(model: nn.Module, image: Tensor, target: int | None = None,
                methods: tuple[str, ...] | None = None) -> dict[str, Explanation]:
    """Run several methods (None: all of :data:`METHODS`) on one image for one target
    (None: the predicted class). Methods that do not apply (attention maps of a model
    without attention) are left out.

    >>> sorted(explain_all(model, image, methods=("saliency", "grad_cam")))
    ['grad_cam', 'saliency']
    """
    methods = tuple(METHODS) if methods is None else methods
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ExplainError(f"unknown methods {unknown}; known: {list(METHODS)}")
    target = _target(model, _prepare(model, image), target)
    results = {name: METHODS[name](model, image, target) for name in methods}
    return {name: e for name, e in results.items() if e is not None}
