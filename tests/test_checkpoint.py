"""Checkpoints: exact round trip, and every kind of bad file refused with one line."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from tests.conftest import DATA, needs_data, small_config
from visattn.checkpoint import atomic_write, load_checkpoint, read_metadata, save_checkpoint
from visattn.errors import CheckpointError, WriteError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    from visattn import create_model

    model = create_model("sa_cnn", **small_config("sa_cnn")[0], similarity="cosine").eval()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, classes=[str(i) for i in range(10)], mean=[0.5] * 3, std=[0.25] * 3, accuracy=0.5)
    return path, model


def test_round_trip_gives_identical_logits(saved) -> None:
    path, model = saved
    loaded, meta = load_checkpoint(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["model"] == "sa_cnn" and meta["config"]["similarity"] == "cosine" and meta["accuracy"] == 0.5
    assert read_metadata(path)["params"] == sum(p.numel() for p in model.parameters())
    assert load_checkpoint(path.read_bytes())[1] == meta  # bytes, as from an upload


def _rewrite(path: Path, tensors: dict, meta: dict) -> bytes:
    return st_save(tensors, metadata={"visattn": json.dumps(meta)})


def bad_files(path: Path) -> dict[str, bytes]:
    data = path.read_bytes()
    meta = read_metadata(path)
    from safetensors.torch import load

    tensors = load(data)
    wrong_shape = dict(tensors)
    key = next(k for k in tensors if k.endswith("q.weight"))
    wrong_shape[key] = torch.zeros(3, 3, 1, 1)
    import io
    import pickle

    buf = io.BytesIO()
    torch.save({"x": torch.zeros(2)}, buf)
    return {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "random bytes": os.urandom(4096),
        "pickle renamed": buf.getvalue(),
        "plain pickle": pickle.dumps({"model": "sa_cnn"}),
        "huge header length": struct.pack("<Q", 2**62) + b"{}",
        "no metadata": st_save(tensors),
        "wrong shapes": _rewrite(path, wrong_shape, meta),
        "missing tensor": _rewrite(path, {k: v for k, v in tensors.items() if k != key}, meta),
        "unknown model": _rewrite(path, tensors, {**meta, "model": "os.system"}),
        "unknown config key": _rewrite(path, tensors, {**meta, "config": {**meta["config"], "evil": 1}}),
        "config out of bounds": _rewrite(path, tensors, {**meta, "config": {**meta["config"], "widths": [10**6] * 3}}),
        "config wrong type": _rewrite(path, tensors, {**meta, "config": {**meta["config"], "heads": {"a": 1}}}),
        "download request": _rewrite(path, tensors, {**meta, "model": "vit_b_16", "config": {"weights": "DEFAULT"}}),
        "metadata not json": st_save(tensors, metadata={"visattn": "{not json"}),
    }


def test_bad_checkpoints_are_refused_with_one_line(saved, tmp_path: Path) -> None:
    path, _ = saved
    for name, data in bad_files(path).items():
        f = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        f.write_bytes(data)
        for source in (f, data):
            with pytest.raises(CheckpointError) as e:
                load_checkpoint(source)
            msg = str(e.value)
            assert msg and "\n" not in msg and len(msg) < 300, (name, msg)


def test_size_limit(saved) -> None:
    path, _ = saved
    with pytest.raises(CheckpointError, match="limit"):
        load_checkpoint(path, max_bytes=1000)


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "c.safetensors"
    atomic_write(target, b"old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(WriteError, match="No space left on device; the previous file is unchanged"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


SHIPPED = sorted(p for p in (ROOT / "checkpoints").glob("*.safetensors") if not p.name.endswith(".state.safetensors"))


@needs_data()
@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_checkpoint_accuracy(path: Path) -> None:
    """On a fixed sample of 1,000 test images, within 2 points of the figure in the metadata."""
    from visattn.data import load_split
    from visattn.train import accuracy

    model, meta = load_checkpoint(path)
    sample = load_split(str(DATA), "test").subset(1000, seed=123)
    acc = accuracy(model, sample, meta["mean"], meta["std"])
    assert abs(acc - meta["accuracy"]) <= 0.02, (acc, meta["accuracy"])
    assert path.stat().st_size <= 20 * 2**20


@needs_data()
def test_default_checkpoint_reaches_90_percent_on_the_whole_test_split() -> None:
    """The shipped default, on all 10,000 test images, as `visattn eval` measures it: at least
    90% top-1, and the figure its metadata quotes."""
    from visattn.data import load_split
    from visattn.train import accuracy

    model, meta = load_checkpoint(ROOT / "checkpoints" / "sa_cnn.safetensors")
    test = load_split(str(DATA), "test")
    assert len(test) == 10_000
    acc = accuracy(model, test, meta["mean"], meta["std"])
    assert acc >= 0.90, acc
    assert abs(acc - meta["accuracy"]) < 1e-3, (acc, meta["accuracy"])


def test_default_checkpoint_is_shipped() -> None:
    meta = read_metadata(ROOT / "checkpoints" / "sa_cnn.safetensors")
    assert meta["model"] == "sa_cnn" and meta["accuracy"] >= 0.85
