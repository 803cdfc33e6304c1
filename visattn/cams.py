"""The CAM family through pytorch-grad-cam (``grad-cam`` 1.5.7), made safe for a shared model.

pytorch-grad-cam hooks the target layer, calls ``model.eval()`` and ``loss.backward()``.
Here its model is a private view (:func:`visattn.layers.probed_view`: new module objects
along the path to the layer, the layer's output running through a private probe that takes
the hooks), the parameters are frozen while it runs (the input carries the gradient, so no
parameter ``.grad`` is written), and every module's train/eval flag and every parameter's
``requires_grad`` are restored afterwards, all under the model's lock. Maps come back as
(B, H, W) in [0, 1] (the package min-max scales each map after a ReLU; a map that was
constant comes back all zero). Score-CAM's tqdm progress bar (written to stderr once per
image) is switched off in that package module.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from visattn.errors import VisattnError
from visattn.layers import held, layer_name, probed_view

#: visattn name -> pytorch_grad_cam class name
CAMS = {
    "score_cam": "ScoreCAM", "grad_cam_plus_plus": "GradCAMPlusPlus", "xgrad_cam": "XGradCAM",
    "layer_cam": "LayerCAM", "hires_cam": "HiResCAM", "eigen_cam": "EigenCAM",
}


class _Quiet:
    """Stands in for the ``tqdm`` module inside ``pytorch_grad_cam.score_cam``: bars disabled."""

    @staticmethod
    def tqdm(iterable, *args, **kwargs):
        import tqdm

        return tqdm.tqdm(iterable, *args, **{**kwargs, "disable": True})


def cam_maps(method: str, model: nn.Module, images: Tensor, targets: Tensor | list[int] | int | None = None,
             layer: nn.Module | str | None = None, batch_size: int = 32) -> tuple[np.ndarray, list[int]]:
    """One CAM method on a batch: ((B, H, W) float32 maps in [0, 1], targets).

    Args:
        method: a key of :data:`CAMS`. model: classifier. images: (B, 3, H, W).
        targets: class per image (or one for all); None: the predicted classes.
        layer: as for :func:`visattn.explain.grad_cam` (None: its default layer).
        batch_size: masked images per forward (Score-CAM).

    >>> from visattn import create_model
    >>> maps, targets = cam_maps("eigen_cam", create_model("sa_cnn").eval(), torch.rand(2, 3, 32, 32))
    >>> maps.shape
    (2, 32, 32)
    """
    if method not in CAMS:
        raise VisattnError(f"unknown CAM method {method!r}; known: {', '.join(CAMS)}")
    import pytorch_grad_cam
    from pytorch_grad_cam import score_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    score_cam.tqdm = _Quiet  # no progress bar on a server's or a CLI's stderr
    name = layer_name(model, layer)
    device = next(model.parameters(), images).device
    x = images.detach().to(device=device, dtype=torch.float32).clone()
    with held(model):
        model.requires_grad_(False)
        with torch.no_grad():
            logits = model(x)
        t = logits.argmax(1) if targets is None else torch.as_tensor(targets).long().reshape(-1).expand(len(x))
        view, probe = probed_view(model, name, (int(x.shape[-2]), int(x.shape[-1])))
        cls = getattr(pytorch_grad_cam, CAMS[method])
        with cls(model=view, target_layers=[probe]) as cam:
            cam.compute_input_gradient, cam.batch_size = True, batch_size  # the input carries the gradient
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])
    return np.nan_to_num(np.asarray(maps, dtype=np.float32)), [int(c) for c in t]
