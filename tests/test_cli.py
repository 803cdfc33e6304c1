"""The `visattn` command line on real checkpoints, real images and the bad-input corpus."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.bad_inputs import make_corpus
from tests.conftest import DATA, ROOT, needs_data, small_config
from visattn import create_model
from visattn.checkpoint import load_checkpoint, save_checkpoint
from visattn.cli import main
from visattn.errors import CheckpointError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    model = create_model("sa_cnn", **small_config("sa_cnn")[0])
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    save_checkpoint(path, model, classes=classes, mean=[0.5] * 3, std=[0.25] * 3, accuracy=0.1, epochs=0)
    return path


def test_predict_bad_inputs_one_line_each_and_the_rest_answered(ckpt: Path, tmp_path: Path, capsys) -> None:
    corpus = make_corpus(tmp_path)
    files = [str(p) for p, _ in corpus.values()]
    code = main(["predict", str(ckpt), *files, "--json", "-k", "3"])
    out, err = capsys.readouterr()
    answered = {r["image"] for r in json.loads(out)}
    bad = [str(p) for p, ok in corpus.values() if not ok]
    good = [str(p) for p, ok in corpus.values() if ok]
    assert code == 1 and answered == set(good)
    lines = err.strip().splitlines()
    assert len(lines) == len(bad) and "Traceback" not in err
    for line, path in zip(lines, bad):
        assert line.startswith(path + ": ")
    for r in json.loads(out):
        assert len(r["top"]) == 3 and abs(sum(p for _, p in r["top"])) <= 1.0 + 1e-6


def test_predict_subprocess_has_no_traceback(ckpt: Path, tmp_path: Path) -> None:
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"\x00" * 100)
    r = subprocess.run([sys.executable, "-m", "visattn", "predict", str(ckpt), str(bad)], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_bad_checkpoint_on_the_command_line(tmp_path: Path, capsys) -> None:
    f = tmp_path / "evil.safetensors"
    f.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle's opening bytes
    assert main(["eval", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_explain_writes_overlays_and_raw_maps(ckpt: Path, tmp_path: Path, capsys) -> None:
    """Every layer and head, and every method of ``explain.METHODS``: its PNG and its raw map,
    the library's own map for the predicted class; one that does not apply gets a note."""
    from visattn import explain
    from visattn.inference import prepare

    corpus = make_corpus(tmp_path / "in")
    photo = next(p for name, (p, ok) in corpus.items() if ok and "jpeg" in name.lower())
    assert main(["explain", str(ckpt), str(photo), "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    written = {Path(l).name for l in out.split()}
    applies = set(explain.METHODS) - {"transformer_attribution", "attnlrp"}  # no ViT blocks in sa_cnn
    unavailable = {n for n in err.splitlines() if ": not available for this model: " in n}  # with the reason why
    assert {n.split(":")[0] for n in unavailable} == {"transformer_attribution", "attnlrp"}, err
    assert any("it is not a transformer" in n for n in unavailable), unavailable
    notes = set(err.splitlines()) - unavailable
    flat = {n.split(":")[0] for n in notes if n.endswith(": the map is constant (nothing to draw, no PNG)")}
    assert len(flat) == len(notes) and flat < applies
    assert {"attention_layers_heads.png", "maps.npz", *(f"{m}.png" for m in applies - flat)} <= written
    assert not {f"{m}.png" for m in {*flat, "transformer_attribution", "attnlrp"}} & written
    assert {f"stages_1_1_head{h}.png" for h in range(2)} <= written
    raw = np.load(tmp_path / "out" / "maps.npz")
    assert raw["attention/stages.1.1"].shape == (2, 8, 8)
    assert {f"explain/{m}" for m in applies} == {k for k in raw.files if k.startswith("explain/")}
    assert all(np.ptp(raw[f"explain/{m}"]) == 0 for m in flat)
    model, meta = load_checkpoint(ckpt)
    x = prepare(photo.read_bytes(), meta)[1]
    predicted = int(model(x).argmax(1))
    for name in ("rollout", "grad_cam", "eigen_cam", *flat):
        np.testing.assert_allclose(raw[f"explain/{name}"], explain.METHODS[name](model, x, predicted).map,
                                   rtol=1e-5, atol=1e-6)
    assert (tmp_path / "out" / "rollout.png").read_bytes()[:4] == b"\x89PNG"


def test_explain_chosen_methods_and_an_unknown_one(ckpt: Path, tmp_path: Path, capsys) -> None:
    corpus = make_corpus(tmp_path / "in")
    photo = next(p for name, (p, ok) in corpus.items() if ok and "jpeg" in name.lower())
    assert main(["explain", str(ckpt), str(photo), "--out", str(tmp_path / "a"), "--methods", "saliency", "rollout"]) == 0
    written = {Path(l).name for l in capsys.readouterr().out.split()}
    assert {n for n in written if not n.startswith("stages_")} == {"attention_layers_heads.png", "saliency.png",
                                                                    "rollout.png", "maps.npz"}
    assert main(["explain", str(ckpt), str(photo), "--out", str(tmp_path / "b"), "--methods", "saliency", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown method 'nope'") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_ablate_prints_logits_before_and_after(ckpt: Path, tmp_path: Path, capsys) -> None:
    from visattn.ablation import ablate
    from visattn.inference import prepare

    corpus = make_corpus(tmp_path / "in")
    photo = next(p for name, (p, ok) in corpus.items() if ok and "jpeg" in name.lower())
    assert main(["ablate", str(ckpt), str(photo), "--layer", "stages.1.1", "--heads", "0,1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    model, meta = load_checkpoint(ckpt)
    x = prepare(photo.read_bytes(), meta)[1]
    with torch.no_grad():
        before = model(x)[0]
    after = ablate(model, x, {"stages.1.1": [0, 1]})[0]
    assert r["heads"] == [0, 1] and len(r["after"]["top"]) == 5
    assert np.allclose(list(r["before"]["logits"].values()), before.numpy(), atol=1e-6)
    assert np.allclose(list(r["after"]["logits"].values()), after.numpy(), atol=1e-6)
    assert not np.allclose(before.numpy(), after.numpy(), rtol=1e-4, atol=0)
    assert main(["ablate", str(ckpt), str(photo), "--layer", "stages.1.1", "--heads", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[1].lstrip().startswith("before") and lines[2].lstrip().startswith("after")
    for bad in (["--heads", "0,x"], ["--heads", "9"], ["--layer", "stem", "--heads", "0"], ["--mode", "mean"]):
        args = {"--layer": "stages.1.1", "--heads": "0", **dict(zip(bad[::2], bad[1::2]))}
        assert main(["ablate", str(ckpt), str(photo), *[t for kv in args.items() for t in kv]]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_models_lists_registry_and_shipped(capsys) -> None:
    assert main(["models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "sa_cnn" in out["registry"] and "vit_b_16" in out["registry"]
    assert any(r["model"] == "sa_cnn" for r in out["checkpoints"])


@needs_data()
def test_faithfulness_json_and_table_on_real_test_images(capsys) -> None:
    ckpt = str(ROOT / "checkpoints" / "hybrid_vit.safetensors")
    args = ["faithfulness", ckpt, "--data", str(DATA), "--n", "3", "--steps", "4"]
    fast = ["attention", "rollout", "gae", "transformer_attribution", "grad_cam", "saliency", "hires_cam", "random"]
    assert main([*args, "--json", "--methods", *fast]) == 0  # the slow ones: tests/test_explain.py
    r = json.loads(capsys.readouterr().out)
    layers = [k for k in r if k.startswith("attention (")]
    assert len(layers) == 4 and set(fast) - {"attention"} <= set(r)
    for scores in r.values():  # every protocol by default
        assert {"road_morf", "road_lerf", "road_combined", "positive_auc", "negative_auc"} <= set(scores)
        assert set(scores["baselines"]) == {"blur", "mean"}
        assert all(0 <= v <= 1 for b in scores["baselines"].values() for v in b.values())
    assert main([*args, "--baselines", "mean", "--protocols", "--methods", "rollout", "random"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| method | deletion AUC ↓ | insertion AUC ↑ | s / image") and len(table) == 2 + 2
    assert main([*args, "--methods", "nope"]) == 2 and "unknown method 'nope'" in capsys.readouterr().err

@needs_data()
def test_eval_json_on_real_test_images(ckpt: Path, capsys) -> None:
    assert main(["eval", str(ROOT / "checkpoints" / "sa_cnn.safetensors"), "--data", str(DATA), "--n", "500", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    confusion = np.array(r["confusion"])
    assert confusion.sum() == 500 and r["images"] == 500
    assert r["accuracy"] == pytest.approx(np.trace(confusion) / 500)
    assert r["accuracy"] > 0.8 and len(r["per_class"]) == 10


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          database=None)
@given(data=st.data())
def test_fuzz_checkpoint_loader(ckpt: Path, data) -> None:
    """Mutated, truncated or random checkpoints: a model, or CheckpointError, nothing else."""
    raw = bytearray(ckpt.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "truncate", "random", "header"]))
    if kind == "flip":
        for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
            raw[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "random":
        raw = bytearray(data.draw(st.binary(max_size=2048)))
    else:  # within the JSON header, where the model name, config and shapes live
        n = int.from_bytes(raw[:8], "little")
        for i in data.draw(st.lists(st.integers(8, 8 + n - 1), min_size=1, max_size=4)):
            raw[i] = data.draw(st.integers(32, 126))
    try:
        model, _ = load_checkpoint(bytes(raw))
    except CheckpointError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(model, torch.nn.Module)
