"""The Atlas page under AppTest, on a small atlas of the default checkpoint cached in a
temporary folder; and the way from a point to Explore."""
from __future__ import annotations

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


def test_page_draws_the_cached_atlas(cached, monkeypatch) -> None:
    folder, a = cached
    at = open_atlas(folder, monkeypatch)
    assert not problems(at) and not at.error
    assert "Atlas" in at.title[0].value
    assert any("200 images, PCA" in c.value and "1,024 of 12,800 tokens (random sample)" in c.value for c in at.caption)
    table = at.dataframe[0].value
    assert list(table["head"]) == [h.head for h in a.heads]
    assert np.allclose(table["corr (2D)"], [h.corr for h in a.heads])
    at.selectbox(key="_w_atlas_head").set_value("head 2").run()
    assert list(at.dataframe[0].value["head"]) == [2] and not problems(at)
    at.selectbox(key="_w_atlas_colour").set_value("class").run()
    assert not problems(at)


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
