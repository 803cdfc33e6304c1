"""The Atlas page under AppTest, on a small atlas of the default checkpoint cached in a
temporary folder; and the way from a point to Explore."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DEFAULT_CKPT, needs_data
from tests.test_dashboard import app, problems
from visattn import atlas as qk_atlas
from visattn import atlas_view

pytestmark = [needs_data(), pytest.mark.skipif(not DEFAULT_CKPT.is_file(), reason="no default checkpoint")]
SETTINGS = {"atlas_n": 200, "atlas_method": "pca", "atlas_tokens": 1024}


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A PCA atlas of 200 test images (the page's settings above), in its own cache folder."""
    from visattn.checkpoint import load_checkpoint
    from visattn.data import load_split

    folder = tmp_path_factory.mktemp("atlas_cache")
    model, meta = load_checkpoint(DEFAULT_CKPT)
    a = qk_atlas.build_atlas(model, meta, load_split(None, "test"), n=200, method="pca", max_tokens=1024,
                             cache=folder)
    return folder, a


def open_atlas(folder: Path, monkeypatch, **state):
    original = qk_atlas.cache_path
    monkeypatch.setattr(qk_atlas, "cache_path", lambda key, cache=None: original(key, cache or folder))
    at = app("atlas")
    for key, value in {**SETTINGS, **state}.items():
        at.session_state[key] = value
    return at.run()


def view_data(at) -> dict:
    """The data the page hands to its canvas view (the ``visattn_atlas`` component)."""
    view, = [e for e in at.get("bidi_component") if e.proto.component_name == "visattn_atlas"]
    return json.loads(view.proto.json)


def floats(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), "<f4")


def ints(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), "<i4")


def sprite_image(data: dict) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data["sprite"]))).convert("RGB"))


def test_page_draws_the_cached_atlas(cached, monkeypatch) -> None:
    folder, a = cached
    at = open_atlas(folder, monkeypatch)
    assert not problems(at) and not at.error
    assert "Atlas" in at.title[0].value
    assert any("200 images, PCA" in c.value and "1,024 of 12,800 tokens (random sample)" in c.value for c in at.caption)
    table = at.dataframe[0].value
    assert list(table["head"]) == [h.head for h in a.heads]
    assert np.allclose(table["corr (2D)"], [h.corr for h in a.heads])
    sent = view_data(at)  # what the canvas view draws: this atlas's own points and thumbnails
    assert [(h["layer"], h["head"]) for h in sent["heads"]] == [(h.layer, h.head) for h in a.heads]
    for h, hm in zip(sent["heads"], a.heads):
        assert np.array_equal(floats(h["xy"]).reshape(-1, 2), hm.xy)
        assert np.array_equal(floats(h["norm"]), np.concatenate([hm.qnorm, hm.knorm]))
    assert np.array_equal(ints(sent["layers"]["stages.1.1"]["token"]), a.layers["stages.1.1"]["token"])
    first = sprite_image(sent)[:32, :32].astype(int)  # the sprite's first tile is the first image (JPEG, q 92)
    assert np.abs(first - a.images[0].transpose(1, 2, 0)).mean() < 6
    at.selectbox(key="_w_atlas_head").set_value("head 2").run()
    assert list(at.dataframe[0].value["head"]) == [2] and not problems(at)
    assert [h["head"] for h in view_data(at)["heads"]] == [2]


def test_a_point_opens_in_explore_with_its_image_and_query(cached, monkeypatch) -> None:
    folder, a = cached
    hm = a.head("stages.1.1", 1)
    point = 1024 + 17  # a key
    target = atlas_view.point_target(a, hm, point)
    at = open_atlas(folder, monkeypatch, atlas_point=("stages.1.1", 1, point))
    assert any(target["caption"] in m.value for m in at.markdown)
    assert target["kind"] == "key" and target["sample_index"] == int(a.indices[a.layers["stages.1.1"]["image"][17]])
    token = int(a.layers["stages.1.1"]["token"][17])
    assert target["query_yx"] == ((token // 8 + 0.5) / 8, (token % 8 + 0.5) / 8)
    at.button(key="atlas_open").click().run()
    assert not problems(at)
    assert at.session_state["sample_index"] == target["sample_index"]
    assert tuple(at.session_state["query_yx"]) == target["query_yx"]
    assert at.session_state["layer"] == "stages.1.1" and at.session_state["head"] == "head 1"
    assert "Explore" in at.title[0].value


def test_no_cached_atlas_offers_to_build_one(tmp_path, monkeypatch) -> None:
    at = open_atlas(tmp_path, monkeypatch, atlas_n=500)
    assert not problems(at)
    assert any("No atlas of these settings" in i.value for i in at.info)
    assert at.button(key="atlas_build")


def test_an_atlas_of_uploaded_images_opens_them_in_explore(tmp_path, monkeypatch) -> None:
    """Three uploads: built on the page (PCA), drawn, and a point opens its upload in Explore."""
    from visattn.app.views import sample_png
    from visattn.data import load_split

    split = load_split(None, "test")
    files = [(f"mine{i}.png", sample_png(split, i)) for i in (3, 4, 5)]
    at = open_atlas(tmp_path, monkeypatch, atlas_source="Uploaded images")
    assert any("Upload images" in i.value for i in at.info)
    at.file_uploader(key="atlas_upload").set_value([(n, d, "image/png") for n, d in files]).run()
    assert not problems(at) and any("No atlas of these settings" in i.value for i in at.info)
    at.button(key="atlas_build").click().run()
    assert not problems(at) and not at.error
    assert any("3 images, PCA" in c.value for c in at.caption)
    sent = view_data(at)
    assert sent["image_word"] == "uploaded image" and len(sent["heads"]) == 4
    built, = (tmp_path / "atlas").glob("*.safetensors")
    a = qk_atlas.load_atlas(built)
    assert np.array_equal(a.indices, [0, 1, 2]) and a.classes == list(split.classes)
    point = 5  # a query of the sampled tokens (3 images × 64 tokens: every token)
    hm = a.head("stages.1.1", 0)
    target = atlas_view.point_target(a, hm, point)
    at.session_state["atlas_point"] = ("stages.1.1", 0, point)
    at.run()
    assert any(target["caption"] in m.value and "uploaded image 0" in m.value for m in at.markdown)
    at.button(key="atlas_open").click().run()
    assert not problems(at) and "Explore" in at.title[0].value
    assert at.session_state["uploaded_image"].name == "mine3.png"
    assert at.session_state["uploaded_image"].data == files[0][1]
    assert at.session_state["image_source"] == "Upload an image"
    assert tuple(at.session_state["query_yx"]) == target["query_yx"]
