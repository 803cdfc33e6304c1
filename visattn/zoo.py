"""The model zoo: shipped checkpoints, a user's own, and torchvision's pretrained ViTs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from visattn import paths
from visattn.checkpoint import load_checkpoint, read_metadata
from visattn.errors import CheckpointError, VisattnError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def shipped_checkpoints(folder: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """``{file name: metadata}`` of every checkpoint in ``folder`` (default
    ``visattn.paths.checkpoints()``), the default checkpoint first; each metadata dict
    also holds its ``path``. Training state files and unreadable files are skipped."""
    folder = Path(folder) if folder is not None else paths.checkpoints()
    default = paths.default_checkpoint()
    found = {}
    for path in sorted(folder.glob("*.safetensors"), key=lambda p: (p != default, p.name)):
        if path.name.endswith(".state.safetensors"):
            continue
        try:
            found[path.name] = {**read_metadata(path), "path": str(path)}
        except CheckpointError:
            continue  # a half-written or foreign file in the folder is skipped, not fatal
    return found


def load_torchvision_vit(arch: str = "vit_b_16", weights: str | None = "DEFAULT") -> tuple[nn.Module, dict[str, Any]]:
    """A torchvision ViT with its weights (downloaded to the torch hub cache unless present).

    ``weights=None`` gives random weights (tests, offline machines).
    """
    import torchvision

    from visattn.models import create_model

    try:
        model = create_model(arch, weights=weights).eval()
    except (OSError, RuntimeError, ValueError) as e:  # no network, no cached file, bad name
        raise VisattnError(f"cannot load {arch} weights {weights!r}: {e}".splitlines()[0]) from None
    if weights is None:
        classes = [f"class {i}" for i in range(1000)]
        size = 224
    else:
        w = torchvision.models.get_model_weights(arch).verify(weights)
        classes = list(w.meta["categories"])
        size = w.transforms().crop_size[0]
    meta = {"model": arch, "config": model.visattn_config, "classes": classes, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "image_size": size, "dataset": "ImageNet-1k" if weights else "random weights",
            "accuracy": None, "weights": weights}
    return model, meta


def load_model(spec: str | bytes) -> tuple[nn.Module, dict[str, Any]]:
    """Checkpoint bytes (an upload), ``torchvision:ARCH:WEIGHTS`` (a torchvision weights name,
    or ``none``), or any SOURCE of :func:`visattn.sources.load_model` (a checkpoint path, a
    Hugging Face folder, ``timm:ARCH``, ``torchvision:ARCH``, ``hf:OWNER/NAME``)."""
    from visattn.sources import load_model as open_source

    if isinstance(spec, str) and spec.startswith("torchvision:") and spec.count(":") == 2:
        _, arch, weights = spec.split(":")
        return load_torchvision_vit(arch, None if weights in ("", "none", "None") else weights)
    if isinstance(spec, str):
        return open_source(spec)
    return load_checkpoint(spec)
