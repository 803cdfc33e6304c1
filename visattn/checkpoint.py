"""Checkpoints: one ``.safetensors`` file of tensors plus JSON metadata; never pickle.

A file is validated before any model is built: the safetensors header is parsed by
hand (bounded size), the model name must be registered, the config within bounds,
and every tensor name and shape must match a model built on the ``meta`` device.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from visattn._version import __version__
from visattn.errors import CheckpointError, WriteError
from visattn.models import create_model, list_models

MAX_CHECKPOINT_BYTES = 200 * 1024 * 1024
MAX_HEADER_BYTES = 10 * 1024 * 1024
META_KEY = "visattn"
_INT_BOUND = 4096  # no config integer (width, depth, heads, image size, classes) above this


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: all or nothing.
    A failure (full disk, no permission) raises :class:`WriteError` and leaves ``path``
    as it was, with no temporary file behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint is meant to be shared
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise WriteError(f"cannot write {path}: {e.strerror or e}; the previous file is unchanged") from e
        raise


def tensors_to_bytes(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """Serialise tensors and JSON metadata as safetensors bytes."""
    flat = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return st_save(flat, metadata={META_KEY: json.dumps(meta)})


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **meta: Any) -> dict[str, Any]:
    """Save ``model`` (built by ``create_model``) with its name, config and ``meta``, atomically.

    Example (writes a file)::

        save_checkpoint("checkpoints/x.safetensors", model, classes=CIFAR10_CLASSES, accuracy=0.93)
    """
    model = getattr(model, "module", model)  # DDP / compiled wrappers
    model = getattr(model, "_orig_mod", model)
    full = {
        "model": model.visattn_name,
        "config": model.visattn_config,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "version": __version__,
        "params": sum(p.numel() for p in model.parameters()),
        **meta,
    }
    atomic_write(path, tensors_to_bytes(model.state_dict(), full))
    return full


def read_header(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse a safetensors header: (tensor entries, visattn metadata). Raises CheckpointError."""
    if len(data) < 8:
        raise CheckpointError("not a safetensors checkpoint: the file is too short")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise CheckpointError("not a safetensors checkpoint: bad header length (truncated or another format)")
    try:
        header = json.loads(data[8 : 8 + n])
        meta = json.loads(header.pop("__metadata__", {}).get(META_KEY, "null"))
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"not a safetensors checkpoint: unreadable header ({type(e).__name__})") from None
    if not isinstance(header, dict) or not isinstance(meta, dict):
        raise CheckpointError("not a visattn checkpoint: no visattn metadata (model name and config)")
    return header, meta


def validate_config(name: str, config: Any) -> dict[str, Any]:
    """Refuse unknown models, non-dict configs and values out of bounds (hostile files)."""
    if name not in list_models():
        raise CheckpointError(f"unknown model {name!r} in checkpoint")
    if not isinstance(config, dict):
        raise CheckpointError("checkpoint config is not a mapping")
    for key, value in config.items():
        values = value if isinstance(value, list) else [value]
        if len(values) > 16:
            raise CheckpointError(f"config {key} has {len(values)} entries; at most 16")
        for v in values:
            if isinstance(v, bool) or v is None:
                continue
            if isinstance(v, (int, float)) and not (-_INT_BOUND <= v <= _INT_BOUND):
                raise CheckpointError(f"config {key}={v} is out of bounds")
            if not isinstance(v, (int, float, str)):
                raise CheckpointError(f"config {key} has a value of type {type(v).__name__}")
    if config.get("weights") is not None:
        raise CheckpointError("a checkpoint may not ask for pretrained weights to be downloaded")
    return config


def load_checkpoint(
    source: str | os.PathLike | bytes, *, device: str | torch.device = "cpu", max_bytes: int = MAX_CHECKPOINT_BYTES
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint (path or bytes) into an eval-mode model; returns (model, metadata).

    Example::

        model, meta = load_checkpoint("checkpoints/sa_cnn.safetensors")
        meta["model"], meta["accuracy"]  # ('sa_cnn', 0.9003)
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        if path.stat().st_size > max_bytes:
            raise CheckpointError(f"checkpoint is {path.stat().st_size / 2**20:.0f} MB; the limit is {max_bytes / 2**20:.0f} MB")
        data = path.read_bytes()
    if len(data) > max_bytes:
        raise CheckpointError(f"checkpoint is {len(data) / 2**20:.0f} MB; the limit is {max_bytes / 2**20:.0f} MB")
    header, meta = read_header(data)
    name = meta.get("model")
    config = validate_config(str(name), meta.get("config", {}))
    try:
        with torch.device("meta"):
            skeleton = create_model(name, **config)
    except CheckpointError:
        raise
    except Exception as e:  # a config the model cannot be built from
        raise CheckpointError(f"config does not build a {name}: {e}".splitlines()[0]) from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    found = {k: tuple(v.get("shape", ())) for k, v in header.items() if isinstance(v, dict)}
    if expected.keys() != found.keys():
        missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        raise CheckpointError(f"checkpoint tensors do not fit {name}: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, shape in expected.items():
        if found[k] != shape:
            raise CheckpointError(f"tensor {k} has shape {list(found[k])}, {name} needs {list(shape)}")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"corrupt checkpoint data: {e}".splitlines()[0]) from None
    model = create_model(name, **config)
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a checkpoint file without loading its tensors."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors checkpoint")
        (n,) = struct.unpack("<Q", head)
        return read_header(head + f.read(min(n, MAX_HEADER_BYTES + 1)))[1]
