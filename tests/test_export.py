"""The offline session file: embedded numbers equal the library's, nothing fetched, and in a
real headless Chromium with the network blocked: no script error, a click moves the query."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import DEFAULT_CKPT, ROOT
from visattn import create_model, export
from visattn.errors import VisattnError
from visattn.faithfulness import faithfulness_for
from visattn.inference import analyse
from visattn.maps import grid_index, query_maps, rollout_map

META = {"classes": [f"class {i}" for i in range(10)], "mean": [0.5] * 3, "std": [0.25] * 3, "model": "sa_cnn"}


def png_bytes(seed: int = 0, side: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("sa_cnn", widths=(8, 16, 16), heads=2, attn_stages=(0, 1)).eval()


def embedded(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="visattn-data">(.*?)</script>', page, re.S)
                      .group(1))


def f32(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), "<f4")


def test_embedded_numbers_are_the_librarys(tiny) -> None:
    image = png_bytes()
    page = export.session_html(tiny, META, image, name="noise.png", methods=("saliency", "grad_cam"))
    d = embedded(page)
    a = analyse(tiny, META, image)
    assert np.array_equal(f32(d["probs"]), a.probs.astype(np.float32))
    assert [lay["name"] for lay in d["layers"]] == list(a.trace.attention) == ["stages.0.1", "stages.1.1"]
    for lay in d["layers"]:
        site = a.trace.attention[lay["name"]]
        h, w = site.grid
        rows = f32(lay["rows"]).reshape(h * w, len(export.KINDS), site.heads, h * w)
        for cell in (0, 5, h * w - 1):
            maps = query_maps(site, 0, site.prefix + cell)
            for i, kind in enumerate(export.KINDS):
                assert np.array_equal(rows[cell, i], maps[kind].reshape(site.heads, -1)), (lay["name"], cell, kind)
    roll = rollout_map(a.trace)
    assert d["rollout"]["grid"] == list(roll.shape) and np.array_equal(f32(d["rollout"]["values"]), roll.ravel())
    from visattn.explain import METHODS

    maps = {m: METHODS[m](tiny, a.tensor, a.predicted).map for m in ("saliency", "grad_cam")}
    scores = faithfulness_for(tiny, a.tensor, maps, a.predicted)
    assert set(d["faithfulness"]) == {"saliency", "grad_cam", "random"}
    for m, r in scores.items():
        assert d["faithfulness"][m]["deletion_auc"] == pytest.approx(r["deletion_auc"], abs=1e-6)
        assert d["faithfulness"][m]["insertion_auc"] == pytest.approx(r["insertion_auc"], abs=1e-6)
    png = Image.open(io.BytesIO(base64.b64decode(d["image"])))
    assert np.array_equal(np.asarray(png), a.image)
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page) and "fetch(" not in page
    assert "default-src 'none'" in page  # the browser refuses any request the page might make


def test_layer_choice_and_size_guard(tiny, monkeypatch) -> None:
    d = embedded(export.session_html(tiny, META, png_bytes(), layers=["stages.1.1"], methods=()))
    assert [lay["name"] for lay in d["layers"]] == ["stages.1.1"] and set(d["faithfulness"]) == {"random"}
    with pytest.raises(VisattnError, match="no attention layer 'x'; this model's: stages.0.1, stages.1.1"):
        export.session_html(tiny, META, png_bytes(), layers=["x"], methods=())
    monkeypatch.setattr(export, "MAX_FLOATS", 1000)
    with pytest.raises(VisattnError, match="choose fewer layers"):
        export.session_html(tiny, META, png_bytes(), methods=())


@pytest.mark.skipif(not DEFAULT_CKPT.exists(), reason="no default checkpoint")
def test_cli_export_of_the_default_model_is_small(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(png_bytes(1, 32))
    out = tmp_path / "session.html"
    r = subprocess.run([sys.executable, "-m", "visattn", "export", str(DEFAULT_CKPT), str(image), "--out", str(out),
                        "--methods", "saliency", "rollout"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 0 < out.stat().st_size < 5 * 2**20
    assert len(embedded(out.read_text())["layers"]) == 1
    bad = subprocess.run([sys.executable, "-m", "visattn", "export", str(DEFAULT_CKPT), str(tmp_path / "nope.png"),
                          "--out", str(tmp_path / "bad.html")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.html").exists()


# ----------------------------------------------------------------------------- a real browser, offline
@pytest.fixture(scope="module")
def offline_driver(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1600",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND", "--allow-file-access-from-files",
                f"--user-data-dir={tmp_path_factory.mktemp('chrome')}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


@pytest.mark.browser
def test_session_file_offline_in_chromium(tiny, offline_driver, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    image = png_bytes(2)
    path = tmp_path / "session.html"
    path.write_text(export.session_html(tiny, META, image, name="noise.png", methods=("saliency",)))
    d = offline_driver
    d.get(path.as_uri())
    deadline = time.monotonic() + 120  # a safety net: a busy machine's Chromium can take long to decode and draw
    while not d.execute_script("return !!(window.visattn && window.visattn.state.renders > 0)"):
        assert time.monotonic() < deadline, "the page never drew its maps"
        time.sleep(0.1)
    grid = lambda: d.execute_script(  # noqa: E731
        "return Array.from(document.querySelectorAll('#grid canvas, #sim canvas')).map(c => c.toDataURL()).join()")
    before, text_before = grid(), d.find_element(By.ID, "query").text
    canvas = d.find_element(By.ID, "image")
    w, h = canvas.size["width"], canvas.size["height"]
    ActionChains(d).move_to_element_with_offset(canvas, -w // 2 + int(w * 0.15), -h // 2 + int(h * 0.2)).click().perform()
    y, x = d.execute_script("return [visattn.state.y, visattn.state.x]")
    assert abs(y - 0.2) < 0.02 and abs(x - 0.15) < 0.02
    assert grid() != before and d.find_element(By.ID, "query").text != text_before

    a = analyse(tiny, META, image)
    for li, (name, site) in enumerate(a.trace.attention.items()):
        cell = d.execute_script("return visattn.cellOf(visattn.data.layers[arguments[0]], arguments[1], arguments[2])",
                                li, y, x)
        assert site.prefix + cell == grid_index(site, y, x)
        maps = query_maps(site, 0, site.prefix + cell)
        for kind in export.KINDS:
            for head in range(site.heads):
                shown = d.execute_script("return Array.from(visattn.mapOf(arguments[0], arguments[1], arguments[2], "
                                         "arguments[3]))", li, kind, head, cell)
                assert np.array_equal(np.asarray(shown, np.float32), maps[kind][head].ravel())
    probs = d.execute_script("return Array.from(visattn.probs)")
    assert np.array_equal(np.asarray(probs, np.float32), a.probs.astype(np.float32))
    shown_top = d.find_element(By.ID, "pred").text.splitlines()[0]
    assert shown_top.startswith(a.top(1)[0][0])

    d.find_element(By.CSS_SELECTOR, "#head option[value='1']").click()  # one head instead of the mean
    assert d.execute_script("return visattn.state.head") == 1
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
