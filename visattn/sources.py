"""Open the models people have: one ``SOURCE`` string for every library.

``load_model(source, weights=..., labels=...) -> (model, meta)`` accepts

- a visattn checkpoint (``checkpoints/sa_cnn.safetensors``);
- ``timm:<architecture>``, built by timm, with ``weights`` (a safetensors state dict,
  loaded strictly) or ``pretrained=True`` (timm's own hub download, for users online);
- a Hugging Face folder in the ``save_pretrained`` layout (``config.json`` +
  ``model.safetensors``), or ``hf:<repo id>`` from the hub cache (downloaded only when
  missing and the hub is reachable);
- ``torchvision:<architecture>`` with ``weights`` (or ``pretrained=True``).

The model is in eval mode, takes a float batch (B, 3, H, W) preprocessed as ``meta`` says
(``image_size``, ``resize``, ``interpolation``, ``mean``, ``std``) and returns logits;
``meta["classes"]`` names them (a labels file, ``id2label``, ImageNet's names for
pretrained weights, else indices). Only safetensors are read: a pickle (``.bin``,
``.pth``) is refused with the command that converts it, and nothing in it runs.
"""
from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visattn.errors import CheckpointError

MAX_WEIGHTS_BYTES = 2 * 1024**3
MAX_JSON_BYTES = 8 * 1024 * 1024  # config.json with 21,843 ImageNet-21k labels is ~1 MB
MAX_CLASSES = 100_000
_CONFIG_INT_BOUND = 100_000
HUB_PROBE_SECONDS = 5  # how long an unreachable hub is waited for
_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".pkl", ".pickle", ".ckpt")
_REPO_ID = re.compile(r"^[\w.-]{1,96}/[\w.-]{1,96}$")
_OPTION_KEY = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
_UNSAFE_OPTION = re.compile(r"pretrained|checkpoint|path|file|cache|url")
HUB_FILES = ["config.json", "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json",
             "model-*.safetensors"]
CONVERT = ('python -c "import torch; from safetensors.torch import save_file; '
           "save_file(torch.load('{src}', weights_only=True), '{dst}')\"")


class HFClassifier(nn.Module):
    """A Hugging Face image classifier whose forward takes pixel values, returns logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def load_model(
    source: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    pretrained: bool = False,
    options: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Open ``source`` (see the module docstring) as an eval-mode model and its metadata.

    ``options``: architecture arguments for ``timm:`` and ``torchvision:`` sources
    (``num_classes``, ``img_size``, ...), scalars only. Every refusal is one
    :class:`CheckpointError` line.

    >>> from visattn.sources import load_model
    >>> model, meta = load_model("timm:vit_tiny_patch16_224", options={"num_classes": 3})
    >>> meta["image_size"], meta["resize"], meta["classes"]
    (224, 248, ['0', '1', '2'])
    """
    text = os.fspath(source)
    opts = _checked_options(options or {})
    if pretrained and weights is not None:
        raise CheckpointError("give either a weights file or pretrained, not both")
    kind, _, name = text.partition(":")
    if kind == "timm" and name:
        model, meta = _open_timm(name, weights, pretrained, opts)
    elif kind == "torchvision" and name:
        model, meta = _open_torchvision(name, weights, pretrained, opts)
    elif kind == "hf" and name:
        model, meta = _open_hf_folder(_hub_snapshot(name), name)
    elif Path(text).is_dir():
        model, meta = _open_hf_folder(Path(text), text)
    else:
        model, meta = _open_visattn(Path(text))
    if labels is not None:
        meta["classes"] = read_labels(labels, len(meta["classes"]))
    meta["source"] = text
    return model.eval(), meta


def load_with_upload(source: str, data: bytes, name: str, *, options: Mapping[str, Any] | None = None,
                     labels: tuple[str, bytes] | None = None,
                     max_bytes: int = MAX_WEIGHTS_BYTES) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load_model` of ``timm:``/``torchvision:`` ``source`` with an uploaded weights
    file (``data``, the upload's file ``name``) and, optionally, an uploaded labels file
    (``(name, data)``, see :func:`read_labels`): refused in one line when larger than
    ``max_bytes``, a pickle, or not a state dict of the architecture; the bytes go to a
    private temporary folder that is removed afterwards."""
    if len(data) > max_bytes:
        raise CheckpointError(f"{name} is {len(data) / 2**20:.0f} MB; the limit is {max_bytes / 2**20:.0f} MB")

    def safe(file_name: str, default: str) -> str:
        return re.sub(r"[^\w.-]", "_", Path(file_name).name)[-100:] or default

    with tempfile.TemporaryDirectory(prefix="visattn-weights-") as folder:
        path = Path(folder) / safe(name, "weights.safetensors")
        path.write_bytes(data)
        names = None
        if labels is not None:
            names = Path(folder) / "labels" / safe(labels[0], "labels.txt")
            names.parent.mkdir()
            names.write_bytes(labels[1][:MAX_JSON_BYTES + 1])
        model, meta = load_model(source, weights=path, labels=names, options=options)
    meta["weights"] = name
    return model, meta


def parse_options(items: Sequence[str], flag: str = "--set") -> dict[str, Any]:
    """``["num_classes=10", "img_size=(224, 224)", "global_pool=avg"]`` -> a dict (values
    read as Python literals, else kept as text).

    >>> parse_options("num_classes=10 global_pool=avg".split())
    {'num_classes': 10, 'global_pool': 'avg'}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CheckpointError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


# -- safetensors state dicts -----------------------------------------------------------
def refuse_pickle(path: Path) -> None:
    """Raise on a file that is (or claims to be) a pickle: nothing in it is read. A safetensors
    file starts with its header's length (8 bytes, little-endian) and the header's ``{``; its first
    byte may well be ``0x80``, the pickle protocol mark, so that alone does not refuse it."""
    with open(path, "rb") as f:
        head = f.read(9)
    safetensors = len(head) == 9 and head[8:] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size
    pickled = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"
    if path.suffix.lower() in _PICKLE_SUFFIXES or (pickled and not safetensors):
        dst = path.with_suffix(".safetensors").name
        raise CheckpointError(f"{path.name} is a PyTorch pickle; visattn opens safetensors only and runs nothing from a "
                              f"pickle. Convert it once where you trust it: {CONVERT.format(src=path.name, dst=dst)}")


def check_state_dict(model: nn.Module, path: str | os.PathLike, *, max_bytes: int = MAX_WEIGHTS_BYTES) -> None:
    """Refuse a weights file that is not a safetensors state dict of exactly ``model``'s
    names and shapes, read from the file's header alone (the first mismatch is named).
    ``model`` may live on the meta device."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    refuse_pickle(path)
    if path.stat().st_size > max_bytes:
        raise CheckpointError(f"{path.name} is {path.stat().st_size / 2**20:.0f} MB; the limit is {max_bytes / 2**20:.0f} MB")
    try:
        with safe_open(path, framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path.name} is not a safetensors file: {e}".splitlines()[0]) from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in expected:
        if key not in found:
            raise CheckpointError(f"{path.name} does not fit this architecture: it has no tensor {key}")
        if found[key] != expected[key]:
            raise CheckpointError(f"{path.name} does not fit this architecture: {key} has shape {list(found[key])}, "
                                  f"the model needs {list(expected[key])}")
    extra = sorted(found.keys() - expected.keys())
    if extra:
        raise CheckpointError(f"{path.name} does not fit this architecture: unexpected tensor {extra[0]}")


def load_state_dict(model: nn.Module, path: str | os.PathLike, *, max_bytes: int = MAX_WEIGHTS_BYTES) -> None:
    """Load a safetensors state dict into ``model`` strictly, after :func:`check_state_dict`."""
    from safetensors.torch import load_file

    check_state_dict(model, path, max_bytes=max_bytes)
    model.load_state_dict(load_file(Path(path)), strict=True)


def _checked_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Architecture arguments: short names, scalar values within bounds, none that loads a file."""
    out = {}
    for key, value in options.items():
        if not _OPTION_KEY.match(str(key)) or _UNSAFE_OPTION.search(str(key)):
            raise CheckpointError(f"option {key!r} is not allowed (weights come from --weights or --pretrained only)")
        if isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, (int, float)):
            if not -_CONFIG_INT_BOUND <= value <= _CONFIG_INT_BOUND:
                raise CheckpointError(f"option {key}={value} is out of bounds")
        elif isinstance(value, str):
            if len(value) > 64:
                raise CheckpointError(f"option {key} is longer than 64 characters")
        else:
            raise CheckpointError(f"option {key} must be a number, a string or a boolean")
        out[str(key)] = value
    return out


def _build(what: str, build) -> nn.Module:
    try:
        return build()
    except CheckpointError:
        raise
    except Exception as e:  # the library's own complaint about an argument
        raise CheckpointError(f"cannot build {what}: {e}".splitlines()[0]) from None


def _on_meta(build) -> nn.Module:
    """The module ``build()`` makes, on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return build()


def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 0


def _indices(n: int) -> list[str]:
    return [str(i) for i in range(n)]


def _attach(model: nn.Module, weights, pretrained: bool) -> str:
    if weights is not None:
        load_state_dict(model, weights)
        return str(weights)
    return "pretrained" if pretrained else "random"


# -- the libraries ---------------------------------------------------------------------
def _open_timm(arch: str, weights, pretrained: bool, options: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    import timm
    import timm.data

    if not timm.is_model(arch):
        raise CheckpointError(f"unknown timm architecture {arch!r} (timm.list_models() lists them)")
    if weights is not None:  # names and shapes compared on the meta device: nothing allocated for a misfit
        check_state_dict(_build(f"timm:{arch}", lambda: _on_meta(lambda: timm.create_model(arch, **options))), weights)
    if pretrained:
        options = {**options, **_timm_weights_file(arch)}
    model = _build(f"timm:{arch}", lambda: timm.create_model(arch, pretrained=pretrained, **options))
    how = _attach(model, weights, pretrained)
    cfg = timm.data.resolve_model_data_config(model)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or cfg["input_size"][1:]
    n = _num_classes(model)
    classes = _indices(n)
    subset = timm.data.infer_imagenet_subset(model) if pretrained else None
    if subset:
        info = timm.data.ImageNetInfo(subset)
        classes = [info.index_to_description(i).split(",")[0] for i in range(n)]
    side = int(size[0])
    return model, {"model": arch, "library": "timm", "weights": how, "image_size": side,
                   "resize": int(side / cfg.get("crop_pct", 1.0)), "interpolation": cfg.get("interpolation", "bicubic"),
                   "mean": list(cfg["mean"]), "std": list(cfg["std"]), "classes": classes}


def _open_torchvision(arch: str, weights, pretrained: bool, options: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise CheckpointError(f"unknown torchvision classification architecture {arch!r}")
    default = torchvision.models.get_model_weights(arch).DEFAULT
    if weights is not None:
        check_state_dict(_build(f"torchvision:{arch}", lambda: _on_meta(
            lambda: torchvision.models.get_model(arch, weights=None, **options))), weights)
    if pretrained and not (Path(torch.hub.get_dir()) / "checkpoints" / Path(default.url).name).is_file():
        _may_download(f"torchvision:{arch} pretrained weights", default.url, "the torch hub cache")
    model = _build(f"torchvision:{arch}", lambda: torchvision.models.get_model(
        arch, weights=default if pretrained else None, **options))
    how = _attach(model, weights, pretrained)
    t = default.transforms()
    side = int(options.get("image_size", t.crop_size[0]))
    n = _num_classes(model)
    classes = list(default.meta["categories"]) if pretrained else _indices(n)
    return model, {"model": arch, "library": "torchvision", "weights": how, "image_size": side,
                   "resize": round(side * t.resize_size[0] / t.crop_size[0]), "interpolation": t.interpolation.value,
                   "mean": list(t.mean), "std": list(t.std), "classes": classes}


def _read_json(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path.name} is larger than {MAX_JSON_BYTES // 2**20} MB")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path.name} is not valid JSON") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name} is not a JSON object")
    return data


def _check_bounds(value: Any, where: str, depth: int = 0) -> None:
    """Refuse a config with absurd numbers or nesting (a hostile or broken file)."""
    if depth > 6:
        raise CheckpointError(f"config {where} is nested too deeply")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        if not -_CONFIG_INT_BOUND <= value <= _CONFIG_INT_BOUND:
            raise CheckpointError(f"config {where}={value} is out of bounds")
        return
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    if items is None:
        raise CheckpointError(f"config {where} has a value of type {type(value).__name__}")
    if len(value) > MAX_CLASSES:
        raise CheckpointError(f"config {where} has {len(value)} entries")
    for k, v in items:
        _check_bounds(v, f"{where}.{k}" if where else str(k), depth + 1)


def _hf_class(config: dict[str, Any]) -> type:
    """The classifier class the config names, if it is one of transformers' image classifiers."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as NAMES

    kind = config.get("model_type")
    if kind not in NAMES:
        raise CheckpointError(f"model_type {kind!r} is not a Hugging Face image classifier")
    allowed = NAMES[kind] if isinstance(NAMES[kind], tuple) else (NAMES[kind],)
    wanted = (config.get("architectures") or [allowed[0]])[0]
    return getattr(transformers, wanted if wanted in allowed else allowed[0])


def _hf_preprocessing(folder: Path, default: int) -> dict[str, Any]:
    """image_size / resize / interpolation / mean / std from ``preprocessor_config.json``
    (without one: the model's own image size, no crop, mean and std 0.5)."""
    from PIL import Image

    path = folder / "preprocessor_config.json"
    p = _read_json(path) if path.is_file() else {}
    _check_bounds(p, "")

    def side(d: Any, default: int) -> int | list[int]:
        if not isinstance(d, dict):
            return int(d) if isinstance(d, int) else default
        if "shortest_edge" in d:
            return int(d["shortest_edge"])
        return [int(d.get("height", default)), int(d.get("width", default))]

    size = side(p.get("size"), default) if p.get("do_resize", True) else default
    crop = side(p.get("crop_size"), default) if p.get("do_center_crop") else size
    crop_side = crop if isinstance(crop, int) else min(crop)
    resample = p.get("resample", 2)
    names = {int(m): m.name.lower() for m in Image.Resampling}
    mean, std = p.get("image_mean", [0.5] * 3), p.get("image_std", [0.5] * 3)
    if not p.get("do_normalize", True):
        mean, std = [0.0] * 3, [1.0] * 3
    return {"image_size": crop_side, "resize": size, "interpolation": names.get(resample, "bilinear"),
            "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _check_hf_shapes(cls: type, folder: Path, shards: list[Path], name: str) -> None:
    """Compare the shapes in the safetensors headers with the architecture built on the meta
    device (no memory), before transformers allocates anything: the first misfit is named."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in cls._from_config(config).state_dict().items()}
        found = {}
        for shard in shards:
            with safe_open(shard, framework="pt") as f:
                found.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    except (SafetensorError, OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{name}: cannot read: {e}".splitlines()[0][:300]) from None
    for key, shape in expected.items():
        if key in found and found[key] != shape:
            raise CheckpointError(f"{name}: the weights do not fit {cls.__name__}: {key} has shape {list(found[key])}, "
                                  f"the config needs {list(shape)}")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _open_hf_folder(folder: Path, name: str) -> tuple[nn.Module, dict[str, Any]]:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{name}: no config.json (a Hugging Face folder comes from save_pretrained)")
    shards = sorted(folder.glob("model*.safetensors"))
    if not shards:
        pickles = [p for p in sorted(folder.iterdir()) if p.suffix in _PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{name}: {pickles[0].name} is a PyTorch pickle; visattn opens safetensors only and runs nothing from a "
                "pickle. Convert the folder once where you trust it: python -c \"from transformers import "
                f"AutoModelForImageClassification as M; M.from_pretrained('{folder}').save_pretrained('{folder}')\"")
        raise CheckpointError(f"{name}: no model.safetensors")
    config = _read_json(folder / "config.json")
    _check_bounds(config, "")
    cls = _hf_class(config)
    _check_hf_shapes(cls, folder, shards, name)
    try:
        with _quiet_transformers():  # its loading report and progress bar: the one line below says it
            model, info = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                              output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise CheckpointError(f"{name}: cannot load: {e}".splitlines()[0][:300]) from None
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(info.get(what) or [], key=str)
        if keys:
            raise CheckpointError(f"{name}: the weights do not fit {cls.__name__}: {what.replace('_', ' ')[:-1]} {keys[0]}")
    id2label = model.config.id2label or {}
    n = model.config.num_labels
    classes = [str(id2label.get(i, i)) for i in range(n)]
    if all(c == f"LABEL_{i}" for i, c in enumerate(classes)):
        classes = _indices(n)
    meta = {"model": cls.__name__, "library": "transformers", "weights": str(folder), "classes": classes,
            **_hf_preprocessing(folder, int(_pair_first(config.get("image_size", 224))))}
    return HFClassifier(model), meta


def _pair_first(v: Any) -> Any:
    return v[0] if isinstance(v, list) and v else v


def _may_download(what: str, url: str, cache: str) -> None:
    """Return when ``url`` can be downloaded from; else one line saying why (HF_HUB_OFFLINE
    set, or its host unreachable within :data:`HUB_PROBE_SECONDS`): offline never waits on
    a library's retries."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"{what}: not in {cache} and HF_HUB_OFFLINE is set: open a saved file or folder, "
                              "or download them once online")
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HUB_PROBE_SECONDS).close()
    except urllib.error.HTTPError:
        return  # the host answered
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise CheckpointError(f"{what}: not in {cache} and {url.split('/')[2] if '//' in url else url} cannot be "
                              f"reached ({reason}): offline? open a saved file or folder instead") from None


def _timm_weights_file(arch: str) -> dict[str, Any]:
    """timm's pretrained weights of ``arch`` from the Hugging Face cache when they are there
    (``pretrained_cfg_overlay``: timm loads that file, no network); else checks the hub can be
    reached and lets timm download them."""
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    repo = getattr(cfg, "hf_hub_id", None)
    if repo:
        for name in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors"]):
            cached = try_to_load_from_cache(repo, name)
            if isinstance(cached, str):
                return {"pretrained_cfg_overlay": {"file": cached}}
    url = f"{constants.ENDPOINT}/{repo}" if repo else getattr(cfg, "url", None) or constants.ENDPOINT
    _may_download(f"timm:{arch} pretrained weights ({repo or url})", url, f"the Hugging Face cache ({constants.HF_HUB_CACHE})")
    return {}


def _hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot of ``repo_id``; downloaded (safetensors and configs only) when it
    is not cached and the hub can be reached. Offline and not cached: one line, no wait."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if not _REPO_ID.match(repo_id):
        raise CheckpointError(f"{repo_id!r} is not a Hugging Face repo id (owner/name)")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        _may_download(f"hf:{repo_id}", f"{constants.ENDPOINT}/{repo_id}", f"the Hugging Face cache ({constants.HF_HUB_CACHE})")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, etag_timeout=10))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise CheckpointError(f"cannot download hf:{repo_id}: {e}".splitlines()[0][:300]) from None


def _open_visattn(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    from visattn.checkpoint import load_checkpoint, read_metadata

    if not path.is_file():
        raise CheckpointError(f"not found: {path} (a SOURCE is a visattn checkpoint, a Hugging Face folder, "
                              "timm:<arch>, torchvision:<arch> or hf:<repo id>)")
    refuse_pickle(path)
    try:
        read_metadata(path)
    except CheckpointError as e:
        if "no visattn metadata" in str(e):
            raise CheckpointError(f"{path.name} is a bare state dict: say which architecture it is for, e.g. "
                                  f"timm:<arch> --weights {path.name}") from None
        raise
    model, meta = load_checkpoint(path)
    size = int(meta.get("image_size") or meta.get("config", {}).get("image_size") or 32)
    meta.setdefault("image_size", size)
    meta.setdefault("resize", size)
    meta.setdefault("library", "visattn")
    return model, meta


def read_labels(path: str | os.PathLike, n: int) -> list[str]:
    """Class names from a text file (one per line) or JSON (a list, or {"0": "cat", ...});
    there must be exactly ``n``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"labels file not found: {path}")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path.name} is larger than {MAX_JSON_BYTES // 2**20} MB")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        data = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        try:
            data = [data[k] for k in sorted(data, key=int)]
        except ValueError:
            raise CheckpointError(f"{path.name}: JSON labels must map class indices to names") from None
    if not isinstance(data, list) or len(data) != n:
        got = len(data) if isinstance(data, list) else "no"
        raise CheckpointError(f"{path.name} has {got} labels; the model has {n} classes")
    return [str(c)[:80] for c in data]
