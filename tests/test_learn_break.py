"""The Learn page's "break it" step under AppTest: what it shows is what visattn.broken gives
for the same image and breaks (top-k bars and the attention of the chosen position), and a
break the model cannot take is one error line."""
from __future__ import annotations

import base64

import numpy as np
import plotly.io

import torch

from tests.bad_inputs import valid_jpeg
from tests.test_dashboard import app, errors, needs_checkpoint, problems, sample_photo, upload
from visattn import create_model
from visattn.app.lesson import lesson
from visattn.app.views import query_token
from visattn.breaking import broken
from visattn.checkpoint import tensors_to_bytes
from visattn.inference import prepare

CLASSES = [f"class {i}" for i in range(10)]


def figures(at) -> dict[str, object]:
    """The page's plotly figures by title."""
    out = {}
    for chart in at.get("plotly_chart"):
        fig = plotly.io.from_json(chart.proto.spec)
        out[fig.layout.title.text] = fig
    return out


def values(v) -> np.ndarray:
    """A figure's numbers as sent (plotly writes a NumPy array as a typed array: dtype, bdata, shape)."""
    if isinstance(v, dict):
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).astype(float)
        return a.reshape([int(n) for n in str(v["shape"]).split(",")]) if "shape" in v else a
    return np.array(v, dtype=float)


def open_learn(at, name: str, data: bytes):
    at.session_state["image_source"] = "Upload an image"
    at.run()
    upload(at, name, data, key="learn_upload")
    assert not at.exception and not at.error, (problems(at), errors(at))
    return at


def shown_vs_library(at, data: bytes, what: str, **breaks) -> None:
    """The broken top-k bars and attention map on the page equal the library's."""
    handle = at.session_state["model_handle"]
    x = prepare(data, handle.meta)[1]
    trace = broken(handle.model, x, **breaks)
    probs = trace.logits[0].softmax(-1).numpy()
    figs = figures(at)
    assert any(what in m.value for m in at.markdown if m.value.startswith("<div")), what  # the line above the charts
    bars = figs["top-5, broken"]
    top = np.argsort(-probs, kind="stable")[:5]
    assert list(bars.data[0].text) == [f"{p * 100:.1f}%" for p in probs[top]]
    np.testing.assert_allclose(values(bars.data[0].x), probs[top] * 100, rtol=1e-5)
    assert list(bars.layout.yaxis.ticktext) == [handle.meta["classes"][i] for i in top]
    layer = at.session_state["layer"]
    site = trace.attention[layer]
    token = query_token(site, at.session_state["query_yx"])
    les = lesson(site, token, 0)
    np.testing.assert_allclose(values(figs["attention weights, broken"].data[0].z),
                               les.to_grid(site.row(0, token)[0].numpy()), atol=1e-6)
    assert not np.allclose(values(bars.data[0].x), values(figs["top-5, unbroken"].data[0].x), rtol=1e-6)


@needs_checkpoint
def test_break_it_shows_the_library_s_broken_prediction():
    name, data = sample_photo()
    at = open_learn(app("learn"), name, data)
    assert any("Nothing is broken yet" in c.value for c in at.caption)
    assert not any(t.startswith("top-5") for t in figures(at))  # no extra forward until something is broken
    at.select_slider(key="_w_break_scale").set_value(10.0)
    at.checkbox(key="_w_break_sqrt_d").check()
    at.run()
    assert not at.exception and not at.error, (problems(at), errors(at))
    shown_vs_library(at, data, "scores ×10, not divided by √d_k", scale=10.0, sqrt_d=False)
    handle = at.session_state["model_handle"]
    layer = at.session_state["layer"]
    at.select_slider(key="_w_break_scale").set_value(1.0)
    at.checkbox(key="_w_break_sqrt_d").uncheck()
    at.toggle(key="_w_break_positions").set_value(True)
    at.multiselect(key=f"_w_break_heads_{handle.key}").set_value([(layer, 1), (layer, 3)])
    at.run()
    assert not at.exception and not at.error, (problems(at), errors(at))
    shown_vs_library(at, data, "positions off · 2 heads removed", positions=False, heads={layer: [1, 3]})


def tiny_checkpoint(pos_encoding: str, similarity: str) -> bytes:
    """A visattn checkpoint of a small sa_cnn (random weights) as uploaded bytes."""
    config = {"widths": [8, 16, 16], "heads": 2, "attn_stages": [1], "pos_encoding": pos_encoding,
              "similarity": similarity, "gate_init": 1.0}
    model = create_model("sa_cnn", **config)
    with torch.no_grad():  # every weight random (the whitening stem is zero until fitted to data)
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    meta = {"model": "sa_cnn", "config": model.visattn_config, "classes": CLASSES,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    return tensors_to_bytes(model.state_dict(), meta)


def test_positions_off_on_a_model_without_them_is_one_line():
    """A cosine sa_cnn without positions: switching them off is one error line, leaving out √d_k
    is explained as not applying, and ×5 (the learned temperature ×5) is shown as the library gives it."""
    at = app("learn")
    at.session_state["model_source"] = "Upload .safetensors"
    at.run()
    at.file_uploader(key="checkpoint_upload").set_value(("none.safetensors", tiny_checkpoint("none", "cosine"),
                                                         "application/octet-stream"))
    data = valid_jpeg(48, 40)
    open_learn(at, "photo.jpg", data)
    assert at.session_state["model_handle"].meta["config"]["pos_encoding"] == "none"
    assert any("has no position encoding" in c.value for c in at.caption)
    at.toggle(key="_w_break_positions").set_value(True).run()
    assert not at.exception, problems(at)
    assert len(at.error) == 1 and "\n" not in at.error[0].value, errors(at)
    assert "no position table or sinusoidal code to switch off" in at.error[0].value
    at.toggle(key="_w_break_positions").set_value(False)
    at.checkbox(key="_w_break_sqrt_d").check().run()
    assert any("there is no √d_k to leave out" in c.value for c in at.caption)
    at.checkbox(key="_w_break_sqrt_d").uncheck()
    at.select_slider(key="_w_break_scale").set_value(5.0).run()  # the page lives on: the next break works
    assert not at.exception and not at.error, (problems(at), errors(at))
    shown_vs_library(at, data, "scores ×5", scale=5.0)


def go_to(at, title: str):
    """Open the page called ``title`` in the navigation, as its sidebar link does (AppTest's
    own ``switch_page`` takes file pages only; the dashboard's pages are callables)."""
    at._page_hash = next(h for h, info in at._registered_pages.items() if info.get("page_name") == title)
    return at.run()


@needs_checkpoint
def test_what_was_broken_stays_broken_after_a_visit_to_another_page():
    name, data = sample_photo()
    at = open_learn(app("learn"), name, data)
    handle, layer = at.session_state["model_handle"], at.session_state["layer"]
    at.select_slider(key="_w_break_scale").set_value(5.0)
    at.toggle(key="_w_break_positions").set_value(True)
    at.multiselect(key=f"_w_break_heads_{handle.key}").set_value([(layer, 2)])
    at.run()
    go_to(at, "Explore")
    assert not at.get("select_slider") and any(m.value.startswith("Predicted **") for m in at.markdown)
    go_to(at, "Learn")
    assert not at.exception and not at.error, (problems(at), errors(at))
    assert at.select_slider(key="_w_break_scale").value == 5.0 and at.toggle(key="_w_break_positions").value
    assert at.multiselect(key=f"_w_break_heads_{handle.key}").value == [(layer, 2)]
    shown_vs_library(at, data, "scores ×5 · positions off · 1 head removed", scale=5.0, positions=False,
                     heads={layer: [2]})
