"""`visattn predict SOURCE IMAGE` for every kind of SOURCE, as a user runs it (subprocess),
agreeing with the library; refusals are one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.foreign_models import HF_FAMILIES, SIDE, TIMM_BASE, TINY_TIMM, tiny_hf, tiny_timm
from tests.test_sources import hub_cache
from visattn.cli import main
from visattn.inference import predict_image
from visattn.sources import load_model

pytest.importorskip("timm")
pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visattn", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    g = torch.Generator().manual_seed(0)
    Image.fromarray(torch.randint(0, 256, (48, 64, 3), generator=g, dtype=torch.uint8).numpy()).save(path)
    return path


def top_of(stdout: str) -> list[list]:
    (result,) = json.loads(stdout)
    return result["top"]


def test_predict_timm_weights(tmp_path: Path, photo: Path) -> None:
    save_file(tiny_timm("deit_distilled").state_dict(), tmp_path / "w.safetensors")
    sets = [x for k, v in TIMM_BASE.items() for x in ("--set", f"{k}={v}")]
    r = run("predict", "timm:deit_tiny_distilled_patch16_224", str(photo), "--weights", str(tmp_path / "w.safetensors"),
            *sets, "--json")
    assert r.returncode == 0, r.stderr
    model, meta = load_model("timm:deit_tiny_distilled_patch16_224", weights=tmp_path / "w.safetensors", options=TIMM_BASE)
    expected = predict_image(model, meta, photo.read_bytes())
    assert [c for c, _ in top_of(r.stdout)] == [c for c, _ in expected]
    assert [p for _, p in top_of(r.stdout)] == pytest.approx([p for _, p in expected], abs=1e-5)


def test_predict_hub_id_offline_from_the_cache(tmp_path: Path, photo: Path) -> None:
    tiny_hf("vit").save_pretrained(tmp_path / "saved")
    (tmp_path / "labels.txt").write_text("cat\ndog\nfox\nowl\nbee\n")
    cache = hub_cache(tmp_path / "cache", "someone/tiny-vit", tmp_path / "saved")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    r = run("predict", "hf:someone/tiny-vit", str(photo), "--labels", str(tmp_path / "labels.txt"), "--json", env=env)
    assert r.returncode == 0, r.stderr
    model, meta = load_model(tmp_path / "saved", labels=tmp_path / "labels.txt")
    assert top_of(r.stdout) == [[c, pytest.approx(p, abs=1e-5)] for c, p in predict_image(model, meta, photo.read_bytes())]
    assert {c for c, _ in top_of(r.stdout)} <= {"cat", "dog", "fox", "owl", "bee"}
    r = run("predict", "hf:someone/not-cached", str(photo), env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: hf:someone/not-cached: not in the Hugging Face cache")
    assert len(r.stderr.strip().splitlines()) == 1


def test_predict_refuses_a_pickle_in_one_line(tmp_path: Path, photo: Path) -> None:
    torch.save(tiny_timm("vit").state_dict(), tmp_path / "w.pth")
    r = run("predict", "timm:vit_tiny_patch16_224", str(photo), "--weights", str(tmp_path / "w.pth"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "w.pth is a PyTorch pickle" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", ["hf folder", "torchvision", "visattn checkpoint"])
def test_predict_every_other_source(kind: str, tmp_path: Path, photo: Path, capsys) -> None:
    if kind == "hf folder":
        tiny_hf("dinov2_registers").save_pretrained(tmp_path)
        args = [str(tmp_path)]
    elif kind == "torchvision":
        args = ["torchvision:vit_b_32", "--set", f"image_size={SIDE}", "--set", "num_classes=5"]
    else:
        args = [str(ROOT / "checkpoints" / "sa_cnn.safetensors")]
    assert main(["predict", *args, str(photo), "-k", "3", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert len(result["top"]) == 3 and sum(p for _, p in result["top"]) <= 1 + 1e-6


@pytest.mark.parametrize("library, family", [("timm", f) for f in TINY_TIMM] + [("hf", f) for f in HF_FAMILIES])
def test_predict_every_family(library: str, family: str, tmp_path: Path, photo: Path, capsys) -> None:
    """``visattn predict`` (in process) on each family saved as its users save it agrees with the library."""
    if library == "timm":
        save_file(tiny_timm(family).state_dict(), tmp_path / "w.safetensors")
        arch, overrides = TINY_TIMM[family]
        options = {**TIMM_BASE, **overrides}
        args = [f"timm:{arch}", "--weights", str(tmp_path / "w.safetensors"),
                *[x for k, v in options.items() for x in ("--set", f"{k}={v}")]]
        model, meta = load_model(f"timm:{arch}", weights=tmp_path / "w.safetensors", options=options)
    else:
        tiny_hf(family).save_pretrained(tmp_path / "hf")
        args = [str(tmp_path / "hf")]
        model, meta = load_model(tmp_path / "hf")
    assert main(["predict", args[0], str(photo), *args[1:], "--json"]) == 0
    expected = predict_image(model, meta, photo.read_bytes())
    got = top_of(capsys.readouterr().out)
    assert [c for c, _ in got] == [c for c, _ in expected]
    assert [p for _, p in got] == pytest.approx([p for _, p in expected], abs=1e-5)
