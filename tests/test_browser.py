"""A real browser: start the dashboard, drive Debian's headless Chromium with Selenium,
upload a photo, click the image to set a query and check that the maps change; and a
bookmarked page URL opened as the very first request of a fresh server.

Screenshots go to ``$VISATTN_SCREENSHOTS`` (default: the test's temporary folder).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from benchmarks import tabs
from tests.conftest import DATA, DEFAULT_CKPT

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                       reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)"),
    pytest.mark.skipif(not DEFAULT_CKPT.exists(), reason="no default checkpoint"),
]


@contextlib.contextmanager
def dashboard_server() -> Iterator[str]:
    """A fresh ``streamlit run dashboard.py`` on a local port (:func:`benchmarks.tabs.start_server`); yields its URL."""
    url, proc = tabs.start_server(env={"OMP_NUM_THREADS": "1"})
    try:
        yield url
    finally:
        tabs.stop(proc)


@pytest.fixture(scope="module")
def server():
    with dashboard_server() as url:
        yield url


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1600,1400",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-quic", f"--user-data-dir={tmp_path_factory.mktemp('chrome')}"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    path = Path(os.environ.get("VISATTN_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def photo(path: Path) -> Path:
    """A photo-sized JPEG: a real CIFAR-10 test image enlarged, or a drawn scene without the data."""
    src = next((DATA / "test" / "cat").glob("*.jpg"), None) if (DATA / "test").is_dir() else None
    if src is not None:
        img = Image.open(src).convert("RGB").resize((480, 480), Image.BICUBIC)
    else:
        img = Image.new("RGB", (480, 480), (90, 140, 200))
        img.paste((200, 120, 60), (120, 160, 360, 420))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    path.write_bytes(buf.getvalue())
    return path


def wait_for(driver, predicate, timeout: float = 90, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except Exception:  # elements come and go while Streamlit reruns
            pass
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def idle(driver, settle: float = 1.0, timeout: float = 90) -> None:
    """Wait until Streamlit reports no script running (no status widget, no spinner)."""
    from selenium.webdriver.common.by import By

    time.sleep(settle)
    wait_for(driver, lambda: not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"], [data-testid="stSpinner"]'),
             timeout, "the script to finish")


def no_exception(driver) -> None:
    from selenium.webdriver.common.by import By

    assert not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text


def open_uploader(driver, server: str):
    """Open Explore, switch the image source to upload, and return the file input."""
    from selenium.webdriver.common.by import By

    driver.get(server)
    wait_for(driver, lambda: "Explore" in driver.find_element(By.TAG_NAME, "h1").text, what="the Explore page")
    idle(driver)

    def upload_radio():
        return next((e for e in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stRadio"] label')
                     if "Upload an image" in e.text), None)

    wait_for(driver, upload_radio, what="the image-source choice")
    upload_radio().click()
    wait_for(driver, lambda: driver.find_elements(By.CSS_SELECTOR, 'input[type="file"]'), what="the uploader")
    return driver.find_element(By.CSS_SELECTOR, 'input[type="file"]')


def test_upload_click_query_and_every_page(server: str, driver, shots: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    open_uploader(driver, server).send_keys(str(photo(tmp_path / "photo.jpg")))
    frame_sel = 'iframe[title*="streamlit_image_coordinates"]'
    wait_for(driver, lambda: driver.find_elements(By.CSS_SELECTOR, frame_sel), what="the clickable image")
    idle(driver, settle=2)
    no_exception(driver)
    assert not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stAlertContentError"]')
    body = driver.find_element(By.TAG_NAME, "body").text
    assert "photo.jpg" in body
    driver.save_screenshot(str(shots / "explore.png"))

    def maps_digest() -> str:  # what the overlay grid and the similarity maps look like on screen
        images = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stImage"] img')
        return hashlib.sha256(b"".join(i.screenshot_as_png for i in images[:2])).hexdigest()

    def slider_values() -> list[str]:
        return [e.get_attribute("value")
                for e in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSlider"] input[type="range"]')]

    before, sliders_before = maps_digest(), slider_values()
    frame = driver.find_element(By.CSS_SELECTOR, frame_sel)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", frame)
    w, h = frame.size["width"], frame.size["height"]
    ActionChains(driver).move_to_element_with_offset(frame, -w // 2 + int(w * 0.15), -h // 2 + int(h * 0.2)).click().perform()
    wait_for(driver, lambda: slider_values() != sliders_before, what="the query to move")
    idle(driver, settle=2)
    no_exception(driver)
    assert maps_digest() != before, "the overlay grid and similarity maps did not change after the click"
    driver.save_screenshot(str(shots / "explore_after_click.png"))

    for title in ("Compare", "Train", "Models", "Learn"):
        link = next(e for e in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNav"] a') if title in e.text)
        link.click()
        wait_for(driver, lambda: title in driver.find_element(By.TAG_NAME, "h1").text, what=f"the {title} page")
        idle(driver, settle=2, timeout=180)
        no_exception(driver)
        driver.save_screenshot(str(shots / f"{title.lower()}.png"))


def test_bad_upload_shows_one_error_and_next_upload_works(server: str, driver, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    from tests.bad_inputs import make_corpus

    corpus = make_corpus(tmp_path)
    bad = next(p for name, (p, ok) in corpus.items() if not ok and "truncated" in name)
    open_uploader(driver, server).send_keys(str(bad))
    wait_for(driver, lambda: driver.find_elements(By.CSS_SELECTOR, '[data-testid="stAlertContentError"]'),
             what="the error line")
    idle(driver)
    errors = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stAlertContentError"]')
    assert len(errors) == 1 and "\n" not in errors[0].text.strip()
    no_exception(driver)
    driver.find_element(By.CSS_SELECTOR, 'input[type="file"]').send_keys(str(photo(tmp_path / "good.jpg")))
    wait_for(driver, lambda: not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stAlertContentError"]')
             and driver.find_elements(By.CSS_SELECTOR, 'iframe[title*="streamlit_image_coordinates"]'),
             what="the good upload to replace the error")
    no_exception(driver)


def test_bookmarked_page_opens_inside_the_navigation_on_a_fresh_server(driver) -> None:
    """The first request a new server gets is a bookmarked /learn: Learn opens with the
    dashboard around it (navigation listing every page, the sidebar model picker), not
    alone. (Streamlit runs pages/learn.py as a script for a fresh server's first request:
    its ``__main__`` guard hands over to ``pages.main``; see pages/__init__.py.)"""
    from selenium.webdriver.common.by import By

    from pages import PAGES

    with dashboard_server() as url:
        driver.get(url + "/learn")
        wait_for(driver, lambda: "Learn" in driver.find_element(By.TAG_NAME, "h1").text, what="the Learn page")
        idle(driver, settle=2, timeout=180)
        no_exception(driver)
        links = [e.text for e in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNav"] a')]
        assert [t for t in (p.title for p in PAGES) if any(t in link for link in links)] == [p.title for p in PAGES], links
        sidebar = driver.find_element(By.CSS_SELECTOR, '[data-testid="stSidebar"]').text
        assert "Model source" in sidebar and "Checkpoint" in sidebar, sidebar
        assert driver.current_url.rstrip("/").endswith("/learn")


def test_atlas_of_uploads_hover_shows_the_patch_and_a_click_opens_explore(server: str, driver, shots: Path,
                                                                           tmp_path: Path) -> None:
    """Atlas page: upload three photos, build a PCA atlas, point at a dot (the tooltip paints
    its image patch), click it (the page shows it) and open it in Explore."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    def by_text(css: str, text: str):
        return next((e for e in driver.find_elements(By.CSS_SELECTOR, css) if text in e.text), None)

    def body() -> str:
        return driver.find_element(By.TAG_NAME, "body").text

    def plots() -> list:
        return driver.find_elements(By.CSS_SELECTOR, "canvas.va-plot")

    driver.get(server + "/atlas")
    wait_for(driver, lambda: "Atlas" in driver.find_element(By.TAG_NAME, "h1").text, what="the Atlas page")
    idle(driver, settle=2, timeout=180)
    wait_for(driver, lambda: by_text('[data-testid="stRadio"] label', "Uploaded images"), what="the image choice")
    by_text('[data-testid="stRadio"] label', "Uploaded images").click()
    wait_for(driver, lambda: driver.find_elements(By.CSS_SELECTOR, 'input[type="file"]'), what="the uploader")
    photos = [photo(tmp_path / f"atlas{i}.jpg") for i in range(3)]
    for i, p in enumerate(photos):  # three different images
        Image.open(p).rotate(90 * i).save(p, "JPEG", quality=92)
    driver.find_element(By.CSS_SELECTOR, 'input[type="file"]').send_keys("\n".join(str(p) for p in photos))
    wait_for(driver, lambda: "No atlas of these settings" in body() or plots(), timeout=180, what="the atlas")
    by_text('[data-testid="stSelectbox"]', "Embedding").click()
    wait_for(driver, lambda: by_text('[role="option"]', "PCA"), what="the embedding choices")
    by_text('[role="option"]', "PCA").click()
    idle(driver)
    wait_for(driver, lambda: plots() or by_text("button", "Build the atlas"), what="the build button")
    if not plots():  # (the atlas of these photos may be cached by an earlier run)
        by_text("button", "Build the atlas").click()
    wait_for(driver, plots, timeout=240, what="the atlas plots")
    idle(driver, settle=2)
    no_exception(driver)
    plot = driver.find_element(By.CSS_SELECTOR, "canvas.va-plot")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", plot)
    # a drawn dot: the first non-white pixel of the first plot, read back from its canvas
    x, y = driver.execute_script("""
        const c = arguments[0], px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        for (let i = 0; i < px.length; i += 4) if (px[i] + px[i + 1] + px[i + 2] < 600) {
          const j = i / 4; return [j % c.width + 1, Math.floor(j / c.width) + 1]; }
        return null;""", plot)
    w, h = plot.size["width"], plot.size["height"]
    ActionChains(driver).move_to_element_with_offset(plot, x - w // 2, y - h // 2).perform()
    tip = driver.find_element(By.CSS_SELECTOR, ".va-tip")
    wait_for(driver, tip.is_displayed, timeout=10, what="the hover tooltip")
    assert "uploaded image" in tip.text and "head 0" in tip.text, tip.text
    painted = driver.execute_script("""
        const c = arguments[0].querySelector('canvas'), px = c.getContext('2d').getImageData(0, 0, c.height, c.height).data;
        let n = 0; for (let i = 0; i < px.length; i += 4) if (px[i] + px[i + 1] + px[i + 2] < 740) n++; return n;""", tip)
    assert painted > 100, "the tooltip shows no image patch"
    driver.save_screenshot(str(shots / "atlas_hover.png"))
    caption = tip.text.split("norm")[0]
    ActionChains(driver).move_to_element_with_offset(plot, x - w // 2, y - h // 2).click().perform()
    wait_for(driver, lambda: by_text("button", "Open this image and query in Explore"), timeout=60,
             what="the clicked point's details")
    idle(driver)
    assert caption in body(), (caption, body()[-1500:])
    driver.save_screenshot(str(shots / "atlas_click.png"))
    by_text("button", "Open this image and query in Explore").click()
    wait_for(driver, lambda: "Explore" in driver.find_element(By.TAG_NAME, "h1").text, timeout=180, what="Explore")
    idle(driver, settle=2)
    no_exception(driver)
    assert "Using your earlier upload: atlas" in body()
