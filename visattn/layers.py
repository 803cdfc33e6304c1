"""The layers of a model that gradient methods explain, and private views that probe them.

A shared (cached) model is explained without changing it: :func:`probed_view` builds
shallow copies along the path to one layer (everything else shared) with a probe that
Grad-CAM style methods hook, and :func:`held` holds the model's lock and restores its
training / ``requires_grad`` flags afterwards.

>>> from visattn import create_model
>>> model = create_model("sa_cnn")
>>> layer_name(model, None), layer_name(model, "stages.1")
('stages.2', 'stages.1')
"""
from __future__ import annotations

import contextlib
import copy
import re
import threading
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from visattn.errors import ExplainError
from visattn.tokens import guess_layout, token_layout

_BLOCK_NAME = re.compile(r"blocks\.\d+|encoder\.layers\.[^.]+|(\w+\.)*layers?\.\d+")  # timm, torchvision, HF
_CAM_NAME = re.compile(rf"stem|tokenizer|conv_proj|stages\.\d+(\.\d+)?|{_BLOCK_NAME.pattern}")
_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock that gradient methods hold on ``model`` while they run."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(model, threading.RLock())

@contextlib.contextmanager
def held(model: nn.Module) -> Iterator[nn.Module]:
    """Hold :func:`model_lock` and restore every module's ``training`` and every parameter's
    ``requires_grad`` on exit, whatever the method inside changed."""
    with model_lock(model):
        modes = [(m, m.training) for m in model.modules()]
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            yield model
        finally:
            for m, training in modes:
                m.training = training
            for p, requires_grad in flags:
                p.requires_grad_(requires_grad)


def list_cam_layers(model: nn.Module) -> list[str]:
    """Names of modules Grad-CAM can explain: stem/tokenizer, conv stages and their blocks,
    transformer blocks / encoder layers, and top-level convolutions, in forward order.

    >>> from visattn import create_model
    >>> list_cam_layers(create_model("sa_cnn"))
    ['stem', 'stages.0', 'stages.0.0', 'stages.1', 'stages.1.0', 'stages.1.1', 'stages.2', 'stages.2.0']
    """
    return [
        name for name, m in model.named_modules()
        if name and (_CAM_NAME.fullmatch(name) or ("." not in name and isinstance(m, nn.Conv2d)))
    ]


def default_cam_layer(model: nn.Module) -> str:
    """The layer Grad-CAM uses by default: the last stage for models with ``.stages``,
    else the tokenizer output (hybrid_vit), else the last transformer block of a ViT
    (timm, Hugging Face, torchvision: the grid tokens entering it, whose gradient is not
    zero) or the last stage of a timm Swin (its (B, H, W, C) output), else the last
    ``nn.Conv2d`` (seed_cnn).

    >>> from visattn import create_model
    >>> default_cam_layer(create_model("sa_cnn")), default_cam_layer(create_model("hybrid_vit"))
    ('stages.2', 'tokenizer')
    """
    if isinstance(getattr(model, "stages", None), nn.Sequential) and len(model.stages):
        return f"stages.{len(model.stages) - 1}"
    if isinstance(getattr(model, "tokenizer", None), nn.Module):
        return "tokenizer"
    blocks = [name for name in list_cam_layers(model) if _BLOCK_NAME.fullmatch(name)]
    if blocks and (token_layout(model, (224, 224)) is not None or getattr(model, "output_fmt", None) == "NHWC"):
        return blocks[-1]
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ExplainError(f"{type(model).__name__} has no convolution or stage for Grad-CAM")
    return convs[-1]


class GridProbe(nn.Module):
    """Runs ``layer`` with ``probe`` (an Identity that Grad-CAM hooks) on a (B, C, H, W) map:
    a conv layer's output (``channels_last``: a (B, H, W, C) output, as timm's Swin stages
    give), or the grid of the tokens (B, N, C) entering a transformer block (its own output
    tokens never reach a CLS head in the last block), laid out as ``layout(N)`` = (grid,
    prefix) says. Other attributes are the layer's (a Hugging Face Swin encoder reads its
    stages' ``downsample``)."""

    def __init__(self, layer: nn.Module, layout: Callable[[int], tuple[tuple[int, int], int]],
                 channels_last: bool = False) -> None:
        super().__init__()
        self.layer, self.probe, self.layout, self.channels_last = layer, nn.Identity(), layout, channels_last

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if x.dim() != 3 and self.channels_last:
            return self.probe(self.layer(x, *args, **kwargs).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if x.dim() != 3:
            return self.probe(self.layer(x, *args, **kwargs))
        b, n, c = x.shape
        (h, w), p = self.layout(n)
        grid = self.probe(x[:, p:].transpose(1, 2).reshape(b, c, h, w))
        return self.layer(torch.cat([x[:, :p], grid.flatten(2).transpose(1, 2)], dim=1), *args, **kwargs)


def shallow(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)  # same parameters, buffers and hooks; its own child table
    clone._modules = dict(module._modules)
    return clone


def probed_view(model: nn.Module, layer_name: str, hw: tuple[int, int]) -> tuple[nn.Module, nn.Module]:
    """A private view of ``model``: shallow copies along the path to the named layer (all
    else shared), the layer wrapped in a :class:`GridProbe` that reads tokens with the
    model's own layout for ``hw``-pixel inputs (:mod:`visattn.tokens`); returns (view, probe)."""
    known = token_layout(model, hw)

    def layout(n: int) -> tuple[tuple[int, int], int]:
        found = known if known is not None and known.tokens == n else guess_layout(n, hw)
        return found.grid, found.prefix

    view = node = shallow(model)
    *path, leaf = layer_name.split(".")
    for part in path:
        child = shallow(node._modules[part])
        node._modules[part] = child
        node = child
    wrapper = GridProbe(node._modules[leaf], layout, channels_last=getattr(model, "output_fmt", None) == "NHWC")
    node._modules[leaf] = wrapper
    return view, wrapper.probe


def layer_name(model: nn.Module, layer: nn.Module | str | None) -> str:
    if layer is None:
        return default_cam_layer(model)
    names = {m: n for n, m in model.named_modules() if n}
    name = layer if isinstance(layer, str) else names.get(layer)
    if name not in names.values():
        label = layer if isinstance(layer, str) else type(layer).__name__
        raise ExplainError(f"no layer {label!r} inside the model; try one of {list_cam_layers(model)}")
    return name
