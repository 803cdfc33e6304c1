"""Shared fixtures: small configs so every registered model runs fast on CPU."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visattn import paths

ROOT = Path(__file__).resolve().parent.parent
DATA = paths.data()
DEFAULT_CKPT = paths.default_checkpoint()
#: torchrun on this machine: its rendezvous store binds port 0 and the workers share it, so no port is
#: chosen beforehand (a port found free, closed and bound later can be taken meanwhile by another run).
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1"]


def small_config(name: str) -> tuple[dict, int]:
    """(config overrides, input side) that keep a registered model small."""
    if name.startswith("vit_"):
        patch = 14 if name.endswith("14") else int(name.rsplit("_", 1)[1])
        return {"image_size": patch * 3, "num_classes": 10}, patch * 3
    return {
        "sa_cnn": {"widths": (8, 16, 16), "heads": 2, "attn_stages": (0, 1)},
        "hybrid_vit": {"embed_dim": 32, "depth": 2, "heads": 2},
        "cbam_cnn": {"stem_width": 8, "widths": (8, 16, 16)},
    }.get(name, {}), 32


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one intra-op thread than on two contending for two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def needs_data() -> pytest.MarkDecorator:
    return pytest.mark.skipif(not (DATA / "test").is_dir(), reason=f"CIFAR-10 not found at {DATA}")


@pytest.fixture
def shown(monkeypatch: pytest.MonkeyPatch):
    """``shown(image_element) -> (H, W, 3) uint8``: the picture a page sent, read back from
    AppTest's in-memory media store."""
    from streamlit.testing.v1 import app_test

    stores = []

    class Keeping(app_test.MemoryMediaFileStorage):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            stores.append(self)

    monkeypatch.setattr(app_test, "MemoryMediaFileStorage", Keeping)

    def read(element) -> np.ndarray:
        name = element.proto.imgs[0].url.rsplit("/", 1)[1]
        return np.asarray(Image.open(io.BytesIO(stores[-1].get_file(name).content)).convert("RGB"))

    return read
