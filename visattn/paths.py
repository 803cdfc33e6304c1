"""Where things live: the repository root, checkpoints, training runs, the data set and the
decoded-image cache. Each is read at call time and can be moved by an environment variable:

=====================  ======================  =========================================
function               variable                default
=====================  ======================  =========================================
:func:`root`           ``VISATTN_ROOT``        the checkout holding this package, else cwd
:func:`checkpoints`    ``VISATTN_CHECKPOINTS`` ``ROOT/checkpoints``
:func:`runs`           ``VISATTN_RUNS``        ``ROOT/runs``
:func:`data`           ``VISATTN_DATA``        ``ROOT/../shared/datasets/cifar10``
:func:`cache`          ``VISATTN_CACHE``       ``~/.cache/visattn``
=====================  ======================  =========================================

A relative value is taken from :func:`root`, not from the working directory. After a
non-editable install the package is not inside a checkout, so the root is the working
directory (run from the checkout, or set ``VISATTN_ROOT``).

>>> import os
>>> os.environ["VISATTN_RUNS"] = "/tmp/elsewhere"
>>> str(runs())
'/tmp/elsewhere'
>>> del os.environ["VISATTN_RUNS"]
>>> runs() == root() / "runs"
True
"""
from __future__ import annotations

import os
from pathlib import Path

#: The data set, relative to the repository root, when ``VISATTN_DATA`` is not set.
DEFAULT_DATA = "../shared/datasets/cifar10"


def root() -> Path:
    """The repository root: ``$VISATTN_ROOT``, else the checkout this package sits in
    (a folder holding ``pyproject.toml`` next to ``visattn/``), else the working directory."""
    env = os.environ.get("VISATTN_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").is_file():
        return here
    return Path.cwd()


def _resolve(env: str, default: str) -> Path:
    path = Path(os.environ.get(env) or default).expanduser()
    return path if path.is_absolute() else (root() / path).resolve()


def checkpoints() -> Path:
    """The shipped checkpoints: ``$VISATTN_CHECKPOINTS`` or ``ROOT/checkpoints``."""
    return _resolve("VISATTN_CHECKPOINTS", "checkpoints")


def runs() -> Path:
    """Training runs started from the dashboard: ``$VISATTN_RUNS`` or ``ROOT/runs``."""
    return _resolve("VISATTN_RUNS", "runs")


def data() -> Path:
    """The image-folder data set: ``$VISATTN_DATA`` or ``ROOT/../shared/datasets/cifar10``."""
    return _resolve("VISATTN_DATA", DEFAULT_DATA)


def cache() -> Path:
    """Decoded data sets (uint8 tensors): ``$VISATTN_CACHE`` or ``~/.cache/visattn``."""
    return _resolve("VISATTN_CACHE", str(Path.home() / ".cache" / "visattn"))


def default_checkpoint() -> Path:
    """The checkpoint the dashboard opens on: ``checkpoints()/sa_cnn.safetensors``."""
    return checkpoints() / "sa_cnn.safetensors"
