"""The probe (attention maps and their entropy, per layer) and a run's live progress:
status file phases, time-based metric lines, the probe inside an epoch."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import DATA, needs_data
from visattn import capture
from visattn.checkpoint import load_checkpoint
from visattn.data import CIFAR10_MEAN, CIFAR10_STD, load_split, normalise
from visattn.errors import TrainingError
from visattn.models import create_model
from visattn.probe import probe, row_entropy
from visattn.progress import read_status
from visattn.train import TrainConfig, probe_images, train

TWO_LAYERS = {"widths": (8, 16, 16), "heads": 2, "attn_stages": (0, 1)}


def test_probe_recomputes_from_the_captured_weights(one_thread) -> None:
    model = create_model("sa_cnn", **TWO_LAYERS, pos_encoding="relative").train()
    x = torch.randn(3, 3, 32, 32)
    p = probe(model, x)
    assert model.training  # mode restored
    sites = capture(model.eval(), x).attention
    assert list(p) == list(sites) == ["stages.0.1", "stages.1.1"]
    for name, s in sites.items():
        w = s.weights.double()  # (B, heads, N, N)
        by_hand = -(w * w.log()).sum(-1).mean().item()
        assert p[name]["entropy"] == pytest.approx(by_hand, rel=1e-5)
        assert p[name]["uniform"] == pytest.approx(math.log(s.grid[0] * s.grid[1]))
        received = np.asarray(p[name]["received"])
        assert received.shape == s.grid and received.sum() == pytest.approx(1.0, rel=1e-5)
        np.testing.assert_allclose(received.ravel(), w[0].mean(0).mean(0).numpy(), rtol=1e-5)


def test_uniform_attention_has_entropy_log_n() -> None:
    model = create_model("sa_cnn", **TWO_LAYERS, pos_encoding="none")
    for m in model.modules():
        if hasattr(m, "q") and isinstance(m.q, torch.nn.Conv2d):
            torch.nn.init.zeros_(m.q.weight)  # every score 0: softmax is uniform
    for v in probe(model, torch.randn(2, 3, 32, 32)).values():
        assert v["entropy"] == pytest.approx(v["uniform"], rel=1e-6)
    one_hot = torch.zeros(2, 5)
    one_hot[:, 3] = 1
    assert row_entropy(one_hot).tolist() == [0.0, 0.0]


@needs_data()
def test_a_run_reports_progress_and_probes_inside_epochs(tmp_path: Path, one_thread) -> None:
    image = tmp_path / "probe.png"
    Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[:, None, None] * 8, (1, 32, 3))).save(image)
    out = tmp_path / "p.safetensors"
    cfg = TrainConfig(model="sa_cnn", model_config=TWO_LAYERS, data=str(DATA), out=str(out), epochs=2,
                      batch_size=64, subset=640, eval_subset=100, lr=0.2, log_every=1000, log_seconds=0.0,
                      probe=str(image), probe_seconds=0.0)
    train(cfg)
    lines = [json.loads(l) for l in out.with_name("p.metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if l["type"] == "step"]
    # log_seconds=0: a line after every step but each epoch's last (the epoch line has it), plus the untrained probe
    assert [s["step"] for s in steps] == [0, *range(1, 10), *range(11, 20)]
    assert all(set(s["probe"]) == {"stages.0.1", "stages.1.1"} for s in steps)
    assert steps[0]["probe"]["stages.1.1"]["entropy"] <= steps[0]["probe"]["stages.1.1"]["uniform"] + 1e-6
    model, _ = load_checkpoint(out)  # the last probe is the saved model's, on the file first in the batch
    x = normalise(probe_images(str(image), load_split(str(DATA), "test")), CIFAR10_MEAN, CIFAR10_STD)
    assert torch.equal(x[0], normalise(torch.from_numpy(np.array(Image.open(image))).permute(2, 0, 1)[None],
                                       CIFAR10_MEAN, CIFAR10_STD)[0])
    again = probe(model, x)
    for name, layer in lines[-1]["probe"].items():
        np.testing.assert_allclose(layer["received"], again[name]["received"], rtol=1e-4, atol=1e-7)
        assert layer["entropy"] == pytest.approx(again[name]["entropy"], rel=1e-4)
    status = read_status(out.with_name("p.status.json"))
    assert status["phase"] == "done" and status["done"] == status["total"] == 20 and status["eta"] == 0.0
    assert status["accuracy"] == pytest.approx(lines[-1]["test_acc"])


@needs_data()
def test_status_says_why_a_run_failed(tmp_path: Path) -> None:
    out = tmp_path / "f.safetensors"
    cfg = TrainConfig(model="sa_cnn", model_config=TWO_LAYERS, data=str(DATA), out=str(out), epochs=1,
                      batch_size=64, subset=128, eval_subset=50, probe="10000")
    with pytest.raises(TrainingError, match="probe image 10000"):
        train(cfg)
    status = read_status(out.with_name("f.status.json"))
    assert status["phase"] == "failed" and "probe image 10000" in status["message"]
    assert read_status(tmp_path / "absent.json") is None
