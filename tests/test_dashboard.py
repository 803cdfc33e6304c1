"""The Streamlit dashboard (dashboard.py, pages/) under streamlit.testing.v1.AppTest,
and the plain helpers behind it (visattn/app/: views, runs, lesson, figures).

AppTest runs the scripts in this process, so the model cache is shared between tests
and calls can be counted by patching ``visattn.inference.analyse_tensor``.

Every test runs the whole dashboard (``pages.main``: navigation, sidebar picker, page),
opened on the page under test as a visitor of its URL would be (``main(start=...)``: AppTest
switches pages by script file, and these pages are callables). Uploads go through the real
``st.file_uploader`` (AppTest 1.67 can set its files).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pages import PAGES, _state
from tests.bad_inputs import make_corpus, valid_jpeg
from tests.conftest import DEFAULT_CKPT, needs_data
from visattn import explain, paths
from visattn.app import figures, runs, views
from visattn.app.lesson import lesson
from visattn.errors import VisattnError

TIMEOUT = 180  # a bound on one AppTest run, not a speed check (the Compare page test: 19 s at load 3 on 2 cores)

needs_checkpoint = pytest.mark.skipif(
    not DEFAULT_CKPT.is_file(),
    reason="checkpoints/sa_cnn.safetensors is absent (it appears after the first epoch of `make train-default`)",
)


def _dashboard(start: str) -> None:  # AppTest.from_function runs this function's source as the script
    from pages import main

    main(start)


def app(page: str = "explore"):
    """The dashboard, opened on ``page`` (a URL path of ``pages.PAGES``)."""
    from streamlit.testing.v1 import AppTest

    return AppTest.from_function(_dashboard, args=(page,), default_timeout=TIMEOUT)


def problems(at) -> list[str]:
    return [e.value for e in at.exception] + [e.message for e in at.exception]


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def sample_photo() -> tuple[str, bytes]:
    """A real photo (a CIFAR-10 test JPEG) when the data set is here, else a synthetic JPEG."""
    folder = paths.data() / "test" / "cat"
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                return p.name, p.read_bytes()
    return "photo.jpg", valid_jpeg(64, 48)


def upload(at, name: str, data: bytes, key: str = "explore_upload"):
    at.file_uploader(key=key).set_value((name, data, "application/octet-stream"))
    return at.run()


def to_upload_mode(at):
    at.radio(key="_w_image_source").set_value("Upload an image")
    return at.run()


# ----------------------------------------------------------------------------- AppTest: pages
@needs_checkpoint
@pytest.mark.parametrize("spec", PAGES, ids=[p.url_path for p in PAGES])
def test_every_page_renders_on_the_default_checkpoint(spec):
    at = app(spec.url_path).run()
    assert not at.exception, problems(at)
    assert not errors(at), errors(at)
    assert at.title[0].value.startswith(spec.title)
    assert at.session_state["model_handle"].meta["model"] == "sa_cnn"
    assert at.sidebar.radio(key="model_source").value == "Checkpoint"  # the navigation's sidebar ran too


@needs_checkpoint
def test_explore_upload_gives_predictions_and_overlays():
    at = app("explore").run()
    to_upload_mode(at)
    assert [i.value for i in at.info] == ["Upload an image to begin, or switch to a test-set sample."]
    name, data = sample_photo()
    upload(at, name, data)
    assert not at.exception, problems(at)
    assert not errors(at), errors(at)
    assert any(m.value.startswith("Predicted **") for m in at.markdown)
    assert len(at.get("plotly_chart")) == 1  # top-k bars
    assert len(at.image) >= 4  # the overlay grid, the similarity maps, the averaged/rollout overlays
    at.toggle(key="explore_interactive").set_value(True).run()  # similarity maps as plotly charts
    assert not at.exception and len(at.get("plotly_chart")) == 2, problems(at)
    assert {b.label for b in at.get("download_button")} == {"Download figure (PNG)", "Download raw maps (NPZ)",
                                                             "Download offline session (HTML)"}


@needs_checkpoint
def test_a_new_session_keeps_what_the_page_shows():
    """A tab whose replica died reconnects to another one, in a new session; its next rerun
    carries its widgets' values. Here the session's own state is wiped between two runs (the
    widgets' values stay): the page keeps upload mode, opacity and colormap, not the defaults."""
    at = app("explore").run()
    at.slider(key="_w_alpha").set_value(0.8)
    at.selectbox(key="_w_cmap").set_value("viridis")
    to_upload_mode(at)
    for key in [k for k in (*_state.DEFAULTS, "_drawn_widgets") if k in at.session_state]:  # in the dead process
        del at.session_state[key]
    name, data = sample_photo()
    upload(at, name, data)
    assert not at.exception, problems(at)
    assert at.radio(key="_w_image_source").value == at.session_state["image_source"] == "Upload an image"
    assert (at.session_state["alpha"], at.session_state["cmap"]) == (0.8, "viridis")
    assert any(m.value.startswith("Predicted **") and m.value.endswith(f"`{name}`") for m in at.markdown)


@needs_checkpoint
def test_bad_uploads_show_one_error_then_a_good_upload_works(tmp_path):
    at = app("explore").run()
    to_upload_mode(at)
    corpus = make_corpus(tmp_path)
    bad = {name: path for name, (path, ok) in corpus.items() if not ok}
    assert len(bad) >= 8
    for name, path in bad.items():
        upload(at, path.name, path.read_bytes())
        assert not at.exception, (name, problems(at))
        assert len(at.error) == 1, (name, errors(at))
        assert "\n" not in at.error[0].value and "Traceback" not in at.error[0].value, name
        assert not any(m.value.startswith("Predicted **") for m in at.markdown), name
    path, ok = corpus["photo_jpeg"]
    assert ok
    upload(at, path.name, path.read_bytes())
    assert not at.exception and not at.error, (problems(at), errors(at))
    assert any(m.value.startswith("Predicted **") for m in at.markdown)


@needs_checkpoint
def test_query_change_does_not_run_the_model_again(monkeypatch):
    from visattn import inference

    calls = []
    real = inference.analyse_tensor

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "analyse_tensor", counting)
    at = app("explore").run()
    to_upload_mode(at)
    calls.clear()  # the test-set sample of the first run may or may not be analysed already
    upload(at, "fresh.jpg", valid_jpeg(40, 40))  # bytes this process has not analysed yet
    assert len(calls) == 1 and not at.exception and not at.error, (calls, problems(at), errors(at))
    forwards = []
    hook = at.session_state["model_handle"].model.register_forward_hook(lambda *a: forwards.append(1))
    try:
        at.session_state["query_yx"] = (0.1, 0.9)  # what a click does
        at.run()
        at.slider(key="_w_explore_row").set_value(25).run()  # the keyboard way
        assert at.session_state["query_yx"][0] == pytest.approx(25.5 / 32)
        at.slider(key="_w_alpha").set_value(0.8).run()
        at.selectbox(key="_w_cmap").set_value("viridis").run()
        at.selectbox(key="_w_head").set_value("head 1").run()
    finally:
        hook.remove()
    assert not at.exception and not at.error, (problems(at), errors(at))
    assert calls == [1] and forwards == []


@needs_checkpoint
def test_explore_head_lab_heatmap_and_toggles():
    """The head lab's heatmap holds the library's head importance (Δ probability of the
    predicted class, in points); switching heads off redraws the top-k bars from exactly
    one ablated forward (no capture), and the numbers are those of ``visattn.ablate``."""
    import plotly.io

    from visattn.ablation import ablate, head_importance

    at = app("explore").run()
    to_upload_mode(at)
    name, data = sample_photo()
    upload(at, name, data)
    assert len(at.get("plotly_chart")) == 1  # the lab is off by default: no extra forward
    at.toggle(key="explore_heads").set_value(True).run()
    assert not at.exception and not at.error, (problems(at), errors(at))
    handle = at.session_state["model_handle"]
    model = handle.model
    from visattn.inference import prepare

    tensor = prepare(data, handle.meta)[1]
    effects = head_importance(model, tensor)
    heat = plotly.io.from_json(at.get("plotly_chart")[1].proto.spec).data[0]
    assert heat.type == "heatmap" and list(heat.y) == effects.layers
    np.testing.assert_allclose(np.array(heat.z, dtype=float), effects.prob[0] * 100, atol=1e-3)
    forwards = []
    hook = model.register_forward_hook(lambda *a: forwards.append(1))
    try:
        layer = effects.layers[0]
        at.multiselect(key=f"heads_off_{handle.key}").set_value([(layer, 0), (layer, 2)]).run()
    finally:
        hook.remove()
    assert not at.exception and not at.error, (problems(at), errors(at))
    assert forwards == [1]  # the ablated forward only
    after = plotly.io.from_json(at.get("plotly_chart")[-1].proto.spec)
    probs = ablate(model, tensor, {layer: [0, 2]})[0].softmax(-1).numpy()
    top = np.argsort(-probs)[:5]
    assert list(after.data[0].text) == [f"{p * 100:.1f}%" for p in probs[top]]
    assert "2 head(s) off" in after.layout.title.text
    at.toggle(key="explore_patching").set_value(True).run()  # clean: this image; corrupted: it blurred
    assert not at.exception and not at.error, (problems(at), errors(at))
    figs = [plotly.io.from_json(c.proto.spec) for c in at.get("plotly_chart")]
    patched = next(f for f in figs if f.layout.title.text.startswith("Logit difference restored"))
    from visattn.ablation import patching_effects
    from visattn.app.views import blurred

    expected = patching_effects(model, tensor, blurred(tensor)).logit[0] * 100
    assert list(patched.data[0].y) == effects.layers
    np.testing.assert_allclose(np.array(patched.data[0].z, dtype=float), expected, atol=1e-3)


@needs_checkpoint
def test_checkpoint_upload_is_validated(tmp_path):
    at = app("learn").run()
    at.radio(key="model_source").set_value("Upload .safetensors").run()
    assert not at.exception, problems(at)
    for name, data in [("junk.safetensors", b"\x00" * 64), ("text.safetensors", b"hello" * 100),
                       ("huge_header.safetensors", (10**12).to_bytes(8, "little") + b"{}")]:
        at.file_uploader(key="checkpoint_upload").set_value((name, data, "application/octet-stream")).run()
        assert not at.exception, (name, problems(at))
        assert len(at.error) == 1 and "\n" not in at.error[0].value, (name, errors(at))
    data = DEFAULT_CKPT.read_bytes()
    at.file_uploader(key="checkpoint_upload").set_value(("mine.safetensors", data, "application/octet-stream")).run()
    assert not at.exception and not at.error, (problems(at), errors(at))
    handle = at.session_state["model_handle"]
    assert handle.key == f"upload:{views.sha256(data)}" and handle.meta["model"] == "sa_cnn"


@needs_checkpoint
@needs_data()
def test_learn_page_checks_its_numbers():
    at = app("learn").run()
    assert not at.exception and not at.error, (problems(at), errors(at))
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Sum of all the weights"] == "1.000000"
    residual = "Largest difference between input + g·context and the real output"
    assert float(metrics[residual]) < 1e-4
    assert at.latex, "the formula is shown"


@needs_checkpoint
def test_pages_work_without_the_data_set(monkeypatch, tmp_path):
    monkeypatch.setenv("VISATTN_DATA", str(tmp_path / "no_such_dataset"))
    for page in ("explore", "models", "train"):
        at = app(page).run()
        assert not at.exception and not at.error, (page, problems(at), errors(at))
        assert any("not available" in i.value for i in at.info), page


@needs_data()
def test_train_form_starts_and_stops_a_background_run(monkeypatch, tmp_path):
    """The form builds the command and starts it in its own session; Stop signals its group.
    Popen and killpg are faked: no training runs here."""
    started, killed = [], []

    class FakePopen:
        pid = 424242
        returncode = None

        def __init__(self, argv, **kwargs):
            started.append((argv, kwargs))

        def poll(self):
            return self.returncode

        def wait(self, timeout=None):
            self.returncode = -15
            return self.returncode

    monkeypatch.setattr(runs.subprocess, "Popen", FakePopen)
    def killpg(pid, sig):
        killed.append((pid, sig))
        FakePopen.returncode = -sig

    monkeypatch.setattr(runs.os, "killpg", killpg)
    monkeypatch.setattr(runs.os, "getpgid", lambda pid: pid)
    monkeypatch.setenv("VISATTN_RUNS", str(tmp_path))
    monkeypatch.setattr(runs, "_STARTED", {})
    at = app("train").run()
    assert not at.exception, problems(at)
    at.text_input(key="train_name").set_value("unit_test_run")
    at.button(key="train_start").click().run()
    assert not at.exception and not at.error, (problems(at), errors(at))
    (argv, kwargs), = started
    assert argv[1:5] == ["-m", "visattn", "train", "--model"] and kwargs["start_new_session"] is True
    assert argv[argv.index("--out") + 1] == str(tmp_path / "unit_test_run.safetensors")
    assert "heads=1" in argv and "widths=(32,64,)" in argv and "similarity=cosine" in argv
    at.button(key="stop_unit_test_run").click().run()
    assert not at.exception, problems(at)
    assert killed and killed[0][0] == FakePopen.pid
    assert runs.running() == {}
    from visattn.train import lock_holder, run_lock

    out = tmp_path / "busy.safetensors"
    (tmp_path / "busy.log").write_text("the other run's log")
    with run_lock(out):  # as a CLI run training into runs/busy.safetensors would
        assert lock_holder(out) == os.getpid()
        at.text_input(key="train_name").set_value("busy")
        at.button(key="train_start").click().run()
        assert not at.exception and len(at.error) == 1 and "another process" in at.error[0].value, errors(at)
    assert len(started) == 1 and (tmp_path / "busy.log").read_text() == "the other run's log"
    assert lock_holder(out) is None


# ----------------------------------------------------------------------------- helpers, no Streamlit
def test_click_and_pixel_conversions():
    assert views.click_to_yx({"x": 160, "y": 80, "width": 320, "height": 320}) == (0.25, 0.5)
    y, x = views.click_to_yx({"x": 320, "y": 320, "width": 320, "height": 320})
    assert y < 1.0 and x < 1.0
    assert views.click_to_yx(None) is None
    assert views.yx_to_pixel(views.pixel_to_yx(5, 31, 32), 32) == (5, 31)


def test_train_argv_is_validated():
    argv = runs.train_argv("ok-name_1", "sa_cnn", 3, 16, 2, "cosine", "relative", 2048, data="/data")
    assert argv[argv.index("--set") + 1] == "widths=(16,32,)"
    assert "similarity=cosine" in argv and "pos_encoding=relative" in argv and "--subset" in argv
    for bad in ("../escape", "a b", "", "x" * 60):
        with pytest.raises(VisattnError):
            runs.train_argv(bad)
    with pytest.raises(VisattnError):
        runs.train_argv("x", epochs=0)
    with pytest.raises(VisattnError):
        runs.train_argv("x", width=16, heads=3)
    for images in (0, 511):
        with pytest.raises(VisattnError, match="at least 512"):
            runs.train_argv("x", subset=images)
    default = runs.train_argv("x")
    sets = [default[i + 1] for i, word in enumerate(default) if word == "--set"]
    assert default[default.index("--subset") + 1] == "50000" and default[default.index("--epochs") + 1] == "3"
    assert float(default[default.index("--attn-lr-scale") + 1]) == runs.FORM_ATTN_LR_SCALE > 1
    from visattn.cli import parse_overrides
    from visattn.models import create_model
    from visattn.models.attention import SpatialSelfAttention2d

    model = create_model("sa_cnn", **parse_overrides(sets))  # the default form's model, from its --set options
    (attn,) = [m for m in model.modules() if isinstance(m, SpatialSelfAttention2d)]
    assert (attn.grid, attn.heads, attn.similarity, attn.pos_encoding) == ((8, 8), 1, "cosine", "relative")
    assert model.stem.conv.stride == (2, 2) and float(attn.gate) == 1.0 and float(attn.scale()) == pytest.approx(1.0)


def test_read_metrics_tolerates_a_half_written_line(tmp_path):
    p = tmp_path / "r.metrics.jsonl"
    p.write_text(json.dumps({"type": "step", "step": 1, "loss": 2.0}) + "\n" +
                 json.dumps({"type": "epoch", "epoch": 1, "test_acc": 0.5, "probe": [[0.1]]}) + "\n" + '{"type": "st')
    steps, epochs = runs.read_metrics(p)
    assert [s["step"] for s in steps] == [1] and epochs[0]["test_acc"] == 0.5
    assert runs.read_metrics(tmp_path / "absent.jsonl") == ([], [])
    old = runs.read_run(p)  # an older run: one map per epoch, no entropy, no status
    assert old.probes() == [(1, {"attention": {"received": [[0.1]]}})] and old.entropy() == {} and old.status is None
    assert old.probe_image == "0"
    fig = figures.runs_figure({"old": old, "no epochs yet": runs.RunRecord(steps, [], None)})
    names = [t.name for t in fig.data]
    assert names[:3] == ["old", "old: training", "old: test"] and "no epochs yet" in names
    assert list(fig.data[2].y) == [0.5] and list(fig.data[2].x) == [1.0]  # epoch 1 of 1 (no step count)


def test_run_record_follows_probes_and_status(tmp_path):
    layer = lambda e: {"stages.1.1": {"received": [[0.5, 0.5]], "entropy": e, "uniform": 0.693}}  # noqa: E731
    p = tmp_path / "r.metrics.jsonl"
    rows = [{"type": "step", "epoch": 1, "step": 0, "total_steps": 10, "probe_image": "7", "probe": layer(0.69)},
            {"type": "step", "epoch": 1, "step": 3, "total_steps": 10, "loss": 2.0, "train_acc": 0.2, "probe": layer(0.6)},
            {"type": "step", "epoch": 1, "step": 4, "total_steps": 10, "loss": 1.9, "train_acc": 0.3},
            {"type": "epoch", "epoch": 1, "epochs": 2, "step": 5, "total_steps": 10, "loss": 1.8, "train_acc": 0.3,
             "test_acc": 0.4, "probe": layer(0.5)}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from visattn.progress import StatusFile

    StatusFile(tmp_path / "r.status.json").write("training", 5, 10, eta=12.0, force=True)
    r = runs.read_run(p)
    assert r.probe_image == "7" and [s for s, _ in r.probes()] == [0, 3, 5]
    assert r.entropy() == {"stages.1.1": ([0, 3, 5], [0.69, 0.6, 0.5], 0.693)}
    assert r.status["phase"] == "training" and r.status["eta"] == 12.0
    fig = figures.runs_figure({"a": r, "b": r})
    entropy = [t for t in fig.data if t.name.endswith("entropy")]
    assert len(entropy) == 2 and list(entropy[0].x) == [0.0, 0.3, 0.5] and list(entropy[0].y) == [0.69, 0.6, 0.5]


@pytest.mark.parametrize("config", [{"similarity": "dot", "pos_encoding": "relative"},
                                    {"similarity": "cosine", "pos_encoding": "sinusoidal"}])
def test_lesson_reproduces_the_layer(config):
    from visattn.tracing import capture
    from visattn.models import create_model

    model = create_model("sa_cnn", widths=(8, 16, 16), heads=2, **config).eval()
    site = next(iter(capture(model, torch.randn(1, 3, 32, 32)).attention.values()))
    token = views.query_token(site, (0.3, 0.7))
    les = lesson(site, token, head=1)
    assert les.sum_weights == pytest.approx(1.0, abs=1e-5)
    assert les.weights_error < 1e-5 and les.head_context_check < 1e-5
    assert les.residual_error is not None and les.residual_error < 1e-4
    assert les.to_grid(les.weights).shape == site.grid and len(les.top) == 5
    assert les.top[0][2] == pytest.approx(float(les.weights.max()))


def test_enlarge_marks_the_query():
    img = np.zeros((32, 32, 3), np.uint8)
    big = views.enlarge(img, 320, (0.5, 0.5), (8, 8))
    assert big.shape == (320, 320, 3) and (big[160, 150:170] == [0, 255, 255]).all(-1).any()


@needs_checkpoint
@needs_data()
def test_compare_scores_each_map_beside_it_per_attention_layer():
    """On a model with several attention layers, Compare offers each layer's attention;
    every map has its deletion/insertion AUCs beside it, and a sanity verdict appears
    beside the map it checked."""
    at = app("compare").run()
    label = next(lab for lab in at.sidebar.selectbox(key="checkpoint_label").options if "hybrid_vit" in lab)
    at.sidebar.selectbox(key="checkpoint_label").set_value(label).run()
    assert not at.exception and not at.error, (problems(at), errors(at))
    layers = at.selectbox(key="_w_attn_layer").options
    assert len(layers) == 4 and at.selectbox(key="_w_attn_layer").value == layers[-1]
    aucs = [m.value for m in at.markdown if m.value.startswith("deletion AUC")]
    assert len(aucs) == len(explain.METHODS), aucs  # every method of the table applies to hybrid_vit
    at.selectbox(key="_w_attn_layer").set_value(layers[0]).run()
    assert not at.exception and any(s.value == f"Attention ({layers[0]})" for s in at.subheader)
    after = [m.value for m in at.markdown if m.value.startswith("deletion AUC")]
    assert after[0] != aucs[0] and after[1:] == aucs[1:]  # only the attention map changed
    at.selectbox(key="sanity_method").set_value("saliency")
    at.button(key="sanity_run").click().run()
    assert not at.exception and not at.error, (problems(at), errors(at))
    assert sum(m.value.startswith("sanity check: final ρ") for m in at.markdown) == 1
    at.selectbox(key="sanity_method").set_value("attention")  # checked on the first layer ...
    at.button(key="sanity_run").click().run()
    assert not at.exception and not at.error, (problems(at), errors(at))
    verdicts = [m.value for m in at.markdown if m.value.startswith("sanity check: final ρ")]
    assert len(verdicts) == 1 and (at.success or at.warning)
    at.selectbox(key="_w_attn_layer").set_value(layers[-1]).run()  # ... says nothing of the last one
    assert not at.exception and not at.error, (problems(at), errors(at))
    assert not any(m.value.startswith("sanity check: final ρ") for m in at.markdown)
    assert not at.success and not at.warning


@needs_checkpoint
def test_compare_draws_every_method_of_the_table(monkeypatch):
    """Compare lays out whatever ``visattn.explain.METHODS`` holds: a seventh method gets
    its map, its caption and its AUCs like the six others."""
    from visattn import explain

    def edges(model, image, target=None):
        e = explain.saliency(model, image, target)
        return explain.Explanation("edges", e.maps, e.targets, e.seconds)

    monkeypatch.setitem(explain.METHODS, "edges", explain.Method("edges", "Edges (test)", edges))
    at = app("compare").run()
    assert not at.exception and not at.error, (problems(at), errors(at))
    titles = [s.value for s in at.subheader]
    assert [m.label for m in explain.METHODS.values()] == titles[:len(explain.METHODS)], titles
    drawn = len([m for m in at.markdown if m.value.startswith("deletion AUC")])
    missing = len([i for i in at.info if i.value.startswith("Not available")])  # transformer attribution: no ViT blocks
    assert drawn + missing == len(explain.METHODS) and drawn >= 7, (drawn, missing)
