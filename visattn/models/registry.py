"""One registry of model factories: ``create_model(name, **config)`` and ``list_models()``."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import nn

from visattn.errors import CheckpointError

_FACTORIES: dict[str, Callable[[Any], nn.Module]] = {}
_CONFIGS: dict[str, type] = {}


def register_model(name: str, config_cls: type) -> Callable:
    """Decorator: register ``factory(config) -> nn.Module`` under ``name``."""

    def deco(factory: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        _FACTORIES[name] = factory
        _CONFIGS[name] = config_cls
        return factory

    return deco


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_FACTORIES)


def config_class(name: str) -> type:
    if name not in _CONFIGS:
        raise CheckpointError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _CONFIGS[name]


def make_config(name: str, **config: Any) -> Any:
    """Build the config dataclass of ``name``, turning JSON lists back into tuples."""
    cls = config_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(config) - set(fields)
    if unknown:
        raise CheckpointError(f"unknown config keys for {name}: {', '.join(sorted(unknown))}")
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return cls(**fixed)


def create_model(name: str, **config: Any) -> nn.Module:
    """Build a registered model; its name and config stay on it for checkpoints.

    >>> model = create_model("sa_cnn", heads=2, similarity="cosine")
    >>> model.visattn_name, model.visattn_config["heads"]
    ('sa_cnn', 2)
    """
    cfg = make_config(name, **config)
    model = _FACTORIES[name](cfg)
    model.visattn_name = name
    model.visattn_config = dataclasses.asdict(cfg)
    return model
