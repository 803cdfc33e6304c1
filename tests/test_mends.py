"""What reading the code found (issue 17), each pinned by a test: flip alternation from
epoch 0, cutout squares of the asked size, the Learn numbers off any device, the decoded
data-set cache following file changes, on-demand rows and received attention computed one
way, errors of the row path not swallowed, the analysis memo bounded by bytes, and the
model listing with a checkpoint that records no accuracy."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from visattn import create_model, maps
from visattn.app.lesson import lesson
from visattn.app.memo import ByteLRU
from visattn.data import Split, cutout, load_image_folder
from visattn.sites import AttentionSite
from visattn.tracing import Trace, capture

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- training
def test_flip_alternation_starts_at_epoch_0(monkeypatch, tmp_path):
    """Read back from the training loop itself: every image is flipped in exactly one of
    epochs 0 and 1, and epoch 2 repeats epoch 0."""
    from visattn import train as train_module

    n = 256
    ids = torch.arange(n)
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = (ids % 256).to(torch.uint8), (ids // 256).to(torch.uint8)
    split = Split(images, ids % 10, tuple(f"c{i}" for i in range(10)), "synthetic")
    monkeypatch.setattr(train_module, "load_split", lambda *a, **k: split)
    seen: dict[int, dict[int, bool]] = {}
    real_augment, epoch = train_module.augment, [-1]

    def recording(x, flip_mask, *args):
        batch_ids = (x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()).tolist()
        seen.setdefault(epoch[0], {}).update(zip(batch_ids, flip_mask.tolist()))
        return real_augment(x, flip_mask, *args)

    real_flips = train_module.flip_mask

    def flips(n_, seed, e):
        epoch[0] = e
        return real_flips(n_, seed, e)

    monkeypatch.setattr(train_module, "augment", recording)
    monkeypatch.setattr(train_module, "flip_mask", flips)
    train_module.train(train_module.TrainConfig(model="sa_cnn", model_config={"widths": (8, 16, 16), "heads": 2},
                                                out=str(tmp_path / "f.safetensors"), epochs=3, batch_size=64,
                                                eval_subset=64, lr=0.1))
    both = set(seen[0]) & set(seen[1]) & set(seen[2])
    assert len(both) > n // 2
    assert all(seen[0][i] != seen[1][i] for i in both)
    assert all(seen[0][i] == seen[2][i] for i in both)
    assert 0.3 < np.mean([seen[0][i] for i in both]) < 0.7


@pytest.mark.parametrize("size", [1, 4, 5, 8])
def test_cutout_zeroes_a_size_by_size_square(size):
    x = cutout(torch.ones(400, 1, 32, 32), size, torch.Generator().manual_seed(0))
    holes = (x == 0).sum((1, 2, 3))
    assert int(holes.max()) == size * size and bool((holes <= size * size).all())
    inside = x[0, 0] == 0
    rows, cols = inside.any(1).nonzero(), inside.any(0).nonzero()
    assert len(rows) <= size and len(cols) <= size


# ----------------------------------------------------------------------------- Learn off the CPU
class Elsewhere(torch.Tensor):
    """Behaves like a tensor on an accelerator: ``.numpy()`` refuses until ``.cpu()``."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")
        out = super().__torch_function__(func, types, args, kwargs or {})
        return out.as_subclass(torch.Tensor) if func is torch.Tensor.cpu and isinstance(out, torch.Tensor) else out


def _elsewhere(site: AttentionSite) -> AttentionSite:
    moved = {f.name: getattr(site, f.name).as_subclass(Elsewhere) for f in dataclasses.fields(site)
             if isinstance(getattr(site, f.name), torch.Tensor)}
    return dataclasses.replace(site, **moved)


def test_lesson_takes_its_numbers_to_the_cpu():
    model = create_model("sa_cnn", widths=(8, 16, 16), heads=2, pos_encoding="relative").eval()
    site = next(iter(capture(model, torch.rand(1, 3, 32, 32)).attention.values()))
    away = _elsewhere(site)
    with pytest.raises(TypeError, match="cpu"):
        away.q.numpy()
    here, there = lesson(site, 27, head=1), lesson(away, 27, head=1)
    np.testing.assert_array_equal(here.weights, there.weights)
    np.testing.assert_array_equal(here.outputs, there.outputs)
    assert there.weights_error < 1e-5 and there.bias is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_lesson_on_a_cuda_model():
    model = create_model("sa_cnn", widths=(8, 16, 16), heads=2).eval().cuda()
    site = next(iter(capture(model, torch.rand(1, 3, 32, 32, device="cuda")).attention.values()))
    assert lesson(site, 5, head=0).weights_error < 1e-4


# ----------------------------------------------------------------------------- data cache
def _folder(root, colour):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (8, 8), colour if (c, i) == ("a", 0) else (9, 9, 9)).save(root / c / f"{i}.png")


def test_decoded_cache_follows_a_replaced_image(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    _folder(root, (200, 0, 0))
    first = load_image_folder(root, size=8, cache=cache)
    assert first.images[0, :, 0, 0].tolist() == [200, 0, 0]
    assert load_image_folder(root, size=8, cache=cache).images.equal(first.images)  # from the cache
    path = root / "a" / "0.png"
    Image.new("RGB", (8, 8), (0, 0, 200)).save(path)  # same name, same size on disk: new contents
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert load_image_folder(root, size=8, cache=cache).images[0, :, 0, 0].tolist() == [0, 0, 200]
    assert len(list(cache.glob("*.safetensors"))) == 2


# ----------------------------------------------------------------------------- rows and received attention
@pytest.fixture(scope="module")
def kept_and_computed():
    """One hybrid_vit (with a CLS token) captured twice: weights kept, and over the budget."""
    model = create_model("hybrid_vit", embed_dim=32, depth=2, heads=2, cls_token=True).eval()
    x = torch.rand(1, 3, 32, 32)
    kept = list(capture(model, x).attention.values())
    computed = list(capture(model, x, budget_bytes=0).attention.values())
    assert all(s.weights is not None for s in kept) and all(s.weights is None for s in computed)
    return kept, computed


def test_rows_on_demand_equal_the_kept_weights(kept_and_computed):
    for k, c in zip(*kept_and_computed):
        torch.testing.assert_close(c.rows(0, 3, 40), k.weights[0, :, 3:40], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(c.row(0, 17), k.weights[0, :, 17], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(c.full_weights(0), k.full_weights(0), atol=1e-6, rtol=1e-5)


def test_received_attention_is_the_mean_over_grid_queries(kept_and_computed):
    for k, c in zip(*kept_and_computed):
        p = k.prefix
        assert p == 1
        expected = k.weights[0, :, p:, p:].mean(1).reshape(k.heads, *k.grid).numpy()
        np.testing.assert_allclose(maps.received_attention(k), expected, atol=1e-6)
        np.testing.assert_allclose(maps.received_attention(c), expected, atol=1e-6)


def test_errors_of_the_row_path_are_not_swallowed(kept_and_computed, monkeypatch):
    site = kept_and_computed[1][0]

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(AttentionSite, "logit_rows", out_of_memory)
    for compute in (lambda: maps.received_attention(site), lambda: maps.head_entropy(site),
                    lambda: maps.rollout([site], 0)):
        with pytest.raises(RuntimeError, match="out of memory"):
            compute()


# ----------------------------------------------------------------------------- the analysis memo
def test_trace_bytes_count_what_it_holds():
    model = create_model("sa_cnn", widths=(8, 16, 16), heads=2).eval()
    x = torch.rand(2, 3, 32, 32)
    kept, computed = capture(model, x), capture(model, x, budget_bytes=0)
    weights = next(iter(kept.attention.values())).weights
    assert kept.nbytes - computed.nbytes == weights.nbytes == 2 * 2 * 64 * 64 * 4
    assert computed.nbytes >= sum(t.nbytes for s in computed.attention.values() for t in (s.q, s.k, s.v))
    assert Trace(logits=torch.zeros(1, 10)).nbytes == 40


def test_memo_is_bounded_by_bytes_least_recently_used_first():
    memo, calls = ByteLRU(budget=100), []

    def make(name, size):
        calls.append(name)
        return bytes(size)

    for name, size in (("a", 40), ("b", 40)):
        memo.get(name, lambda n=name, s=size: make(n, s), len)
    memo.get("a", lambda: make("a", 40), len)  # a hit: "a" becomes the most recent
    memo.get("c", lambda: make("c", 40), len)  # evicts "b", the least recently used
    assert memo.keys() == ["a", "c"] and memo.used == 80 and calls == ["a", "b", "c"]
    assert len(memo.get("huge", lambda: make("huge", 500), len)) == 500  # returned, not kept
    assert memo.keys() == ["a", "c"] and memo.used == 80


# ----------------------------------------------------------------------------- visattn models
def test_models_lists_a_checkpoint_without_accuracy(tmp_path, monkeypatch, capsys):
    from visattn.checkpoint import save_checkpoint
    from visattn.cli import main

    save_checkpoint(tmp_path / "mine.safetensors", create_model("seed_cnn"), classes=[f"c{i}" for i in range(10)])
    monkeypatch.setenv("VISATTN_CHECKPOINTS", str(tmp_path))
    assert main(["models"]) == 0 and "n/a top-1" in capsys.readouterr().out
    assert main(["models", "--markdown"]) == 0 and "| seed_cnn | n/a |" in capsys.readouterr().out
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [(r["checkpoint"], r["accuracy"]) for r in rows] == [(f"{tmp_path.name}/mine.safetensors", None)]
