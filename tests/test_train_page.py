"""The Train page under AppTest with real training runs (tiny ones, but for the slow test
of the default form): the watch view follows a new run by itself with its progress and the
probe maps of every attention layer; the finished run is in the sidebar and opens in
Explore; an experiment trains its runs in turn and shows them together; bad input is one line.

AppTest does not run fragments on a timer: each ``at.run()`` here stands for one refresh.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import needs_data
from visattn.app import runs
from visattn.checkpoint import read_metadata
from visattn.progress import read_status

pytestmark = needs_data()
TIMEOUT = 120


def _dashboard() -> None:  # AppTest.from_function runs this function's source as the script
    from pages import main

    main("train")


def open_train():
    from streamlit.testing.v1 import AppTest

    return AppTest.from_function(_dashboard, default_timeout=TIMEOUT).run()


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fresh runs/ folder; test accuracy on 200 images so that tiny runs end quickly."""
    folder = tmp_path / "runs"
    monkeypatch.setenv("VISATTN_RUNS", str(folder))
    monkeypatch.setattr(runs, "_STARTED", {})
    monkeypatch.delenv("VISATTN_PUBLIC", raising=False)
    monkeypatch.setitem(runs.DEFAULT_FORM, "eval_subset", 200)
    return folder


def fill(at, name: str, epochs: int = 2, width: int = 16, images: int = 2048, heads: int = 2) -> None:
    at.text_input(key="train_name").set_value(name)
    at.number_input(key="train_epochs").set_value(epochs)
    at.select_slider(key="train_width").set_value(width)
    at.number_input(key="train_subset").set_value(images)
    at.select_slider(key="train_heads").set_value(heads)


def progress_texts(at) -> list[str]:
    return [p.proto.text for p in at.get("progress")]


def refresh_until_done(at, folder: Path, names: list[str], timeout: float = 1200) -> list[str]:
    """Rerun the page (a refresh) until every run is done; the progress texts seen on the way."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        seen += progress_texts(at)
        statuses = [read_status(folder / f"{n}.status.json") for n in names]
        if all(s and s["phase"] in ("done", "failed") for s in statuses) and not runs.running():
            break
        assert time.monotonic() < deadline, (statuses, runs.tail(folder / f"{names[0]}.log"))
        time.sleep(0.5)
    assert [s["phase"] for s in statuses] == ["done"] * len(names), [runs.tail(folder / f"{n}.log") for n in names]
    at.run()
    return seen


def test_the_watch_view_follows_a_new_run_to_explore(lab: Path) -> None:
    at = open_train()
    assert not at.exception and at.session_state["image_source"] == "Test-set sample"  # probe: test image 0
    fill(at, "tiny", epochs=3)
    at.button(key="train_start").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "Started tiny" in at.success[0].value
    assert at.multiselect(key="train_watch").value == [runs.run_label("tiny")]  # switched to it by itself
    assert progress_texts(at), "a progress bar from the first second"
    seen = refresh_until_done(at, lab, ["tiny"])
    assert any(t.startswith("training: epoch") and "step" in t and "left" in t for t in seen), seen
    record = runs.read_run(lab / "tiny.metrics.jsonl")
    assert record.probe_image == str(lab / "tiny.probe.png") and (lab / "tiny.probe.png").is_file()
    assert progress_texts(at) == [f"done: test accuracy {max(e['test_acc'] for e in record.epochs):.1%}"]
    assert at.metric[2].value == f"{record.epochs[-1]['test_acc']:.1%}"
    steps = [s for s, _ in record.probes()]
    # a probe before training and at least one per epoch; how many fall inside an epoch depends on the CPU's
    # pace (one every probe_seconds), so that is tested with probe_seconds=0 in tests/test_probe.py
    assert steps[0] == 0 and len(steps) >= len(record.epochs) + 1 and steps == sorted(steps)
    layers = list(record.probes()[-1][1])
    captions = [c.value for c in at.caption if "entropy" in c.value]  # one under each layer's map
    assert [c.split(" · ")[0] for c in captions] == layers, captions
    options = at.selectbox(key="checkpoint_label").options  # the sidebar's picker, as "label · model · accuracy"
    assert any(o.startswith(runs.run_label("tiny") + ".safetensors · sa_cnn") for o in options), options
    at.button(key="explore_tiny.safetensors").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["checkpoint_label"] == runs.run_label("tiny") + ".safetensors"
    assert at.session_state["model_handle"].meta["epochs"] == 3 and at.title[0].value.startswith("Explore")


def test_an_experiment_trains_its_runs_in_turn_and_overlays_them(lab: Path) -> None:
    at = open_train()
    fill(at, "cls", epochs=1, images=1024)
    at.selectbox(key="train_experiment").set_value("heads")
    at.button(key="train_start").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    names = ["cls-heads1", "cls-heads8"]
    assert at.multiselect(key="train_watch").value == [runs.run_label(n) for n in names]
    assert read_status(lab / "cls-heads8.status.json")["phase"] in ("waiting", "loading", "training", "evaluating",
                                                                    "done")
    refresh_until_done(at, lab, names)
    assert [read_metadata(lab / f"{n}.safetensors")["config"]["heads"] for n in names] == [1, 8]
    first, second = (read_status(lab / f"{n}.status.json") for n in names)
    assert first["updated"] <= second["updated"] - second["elapsed"] + 1.0  # one after the other
    chart = json.loads(at.get("plotly_chart")[0].proto.spec)
    traced = {t.get("name") for t in chart["data"]}
    assert {runs.run_label(n) for n in names} <= traced  # both curves, overlaid
    accuracies = [runs.read_run(lab / f"{n}.metrics.jsonl").epochs[-1]["test_acc"] for n in names]
    metrics = [m for m in at.metric if "test accuracy" in m.label]
    assert [m.value for m in metrics] == [f"{a:.1%}" for a in accuracies]
    assert metrics[1].proto.delta == f"{100 * (accuracies[1] - accuracies[0]):+.1f} points"


def test_refusals_are_one_line(lab: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visattn.train import run_lock

    at = open_train()
    fill(at, "zero", images=0)
    at.button(key="train_start").click().run()
    assert not at.exception and len(at.error) == 1 and "at least 512" in at.error[0].value
    fill(at, "busy")
    with run_lock(lab / "busy.safetensors"):  # as a run training into runs/busy.safetensors would
        at.button(key="train_start").click().run()
        assert not at.exception and len(at.error) == 1 and "another process" in at.error[0].value
    assert not (lab / "busy.probe.png").exists() and not (lab / "busy.log").exists()
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("VISATTN_RUNS", str(tmp_path / "file" / "runs"))
    at.button(key="train_start").click().run()
    assert not at.exception and len(at.error) == 1 and "cannot write" in at.error[0].value, at.error


@pytest.mark.slow
def test_the_default_form_teaches(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Press Start with the defaults: >= 70% on all 10,000 test images, and the probe's
    attention entropy starts at uniform's and falls clearly below it (``make bench`` records
    the time)."""
    monkeypatch.setitem(runs.DEFAULT_FORM, "eval_subset", 0)
    at = open_train()
    at.text_input(key="train_name").set_value("default_form")
    at.button(key="train_start").click().run()
    assert not at.error, [e.value for e in at.error]
    refresh_until_done(at, lab, ["default_form"], timeout=3600)
    record = runs.read_run(lab / "default_form.metrics.jsonl")
    assert record.epochs[-1]["test_acc"] >= 0.70
    _, entropy, uniform = list(record.entropy().values())[-1]
    assert entropy[0] > 0.98 * uniform and entropy[-1] < 0.88 * uniform  # from uniform to focused
