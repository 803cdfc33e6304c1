"""Real browser sessions: N headless Chromium tabs over the real websocket, each uploading its own photo.

Unlike ``benchmarks/sessions.py`` (AppTest threads in one process), this is what users do:
a real ``streamlit run dashboard.py`` server (or several behind nginx, ``deploy/serve.py``),
Debian's Chromium driven by Selenium, one tab per user. Every tab opens Explore, switches
the image source to "Upload an image" and gets a small script that timestamps, inside the
page, the ``change`` event of the file input (t0) and the first moment after it when the
page is settled (t1): the prediction line naming the chosen file and the clickable image
are shown and no spinner or "running" status is left. Then all N tabs get their file (one WebDriver
command each, a few ms apart) and their t1 - t0 are read back; ``latency`` is that
difference (upload, script run, every element drawn by the browser).

Each tab's photo is a different CIFAR-10 test image enlarged to 480×480 (or a drawn scene
without the data); what a tab shows (its file name, "Predicted **cls** (p%)") is read back
and compared with :func:`expected_prediction`, the library's own answer for the same bytes.

    python -m benchmarks.tabs 1 8 16        # one server, the given numbers of tabs
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from visattn import paths

ROOT = paths.root()
DATA = paths.data()
DEFAULT_CKPT = paths.default_checkpoint()

PREDICTION = re.compile(r"Predicted (\S+) \((\d+\.\d)%\)")
HAVE_BROWSER = bool(shutil.which("chromium") and shutil.which("chromedriver"))

# Timestamps in the page: t0 when a file is chosen, t1 when the page has settled after it;
# ``opened`` counts the websockets the page opens from now on (a reconnect after its server died).
WATCH = """
const va = window.__va = {t0: null, t1: null, file: null, checks: 0, opened: 0};
if (!window.__vaSocket) {
  const Plain = window.__vaSocket = window.WebSocket;
  window.WebSocket = class extends Plain {
    constructor(...args) { super(...args); this.addEventListener('open', () => window.__va.opened++); }
  };
}
function settled() {
  if (document.querySelector('[data-testid="stStatusWidget"], [data-testid="stSpinner"]')) return false;
  if (!document.querySelector('iframe[title*="streamlit_image_coordinates"]')) return false;
  return [...document.querySelectorAll('[data-testid="stMarkdownContainer"]')]  // this upload's prediction
    .some(e => e.innerText.startsWith('Predicted ') && e.innerText.includes(va.file));
}
function check() {
  va.checks++;
  if (va.t0 !== null && va.t1 === null && settled()) va.t1 = performance.now();
}
document.addEventListener('change', e => {
  if (e.target.type === 'file' && e.target.files.length) {
    va.t0 = performance.now(); va.t1 = null; va.file = e.target.files[0].name;
  }
}, true);
new MutationObserver(check).observe(document.body, {subtree: true, childList: true, attributes: true});
"""


# ----------------------------------------------------------------------------- inputs
def photos(n: int, folder: Path, side: int = 480) -> list[Path]:
    """``n`` JPEG photos ``tab_<i>.jpg`` in ``folder``: CIFAR-10 test images of rotating classes
    enlarged to ``side`` px (drawn scenes of different colours when the data set is absent)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    classes = sorted(p for p in (DATA / "test").iterdir() if p.is_dir()) if (DATA / "test").is_dir() else []
    files = [sorted(c.glob("*.jpg")) for c in classes]
    out = []
    for i in range(n):
        if classes:
            src = files[i % len(classes)][i // len(classes)]
            img = Image.open(src).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
        else:
            img = Image.new("RGB", (side, side), ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256))
            img.paste(((200 + 7 * i) % 256, 120, 60), (side // 4, side // 3, 3 * side // 4, 7 * side // 8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=92)
        path = folder / f"tab_{i}.jpg"
        path.write_bytes(buf.getvalue())
        out.append(path)
    return out


def expected_prediction(path: Path, checkpoint: Path = DEFAULT_CKPT) -> tuple[str, str]:
    """(class, "p.p") the Explore page should show for ``path``: the library's own answer."""
    from visattn import inference, zoo

    model, meta = zoo.load_model(str(checkpoint))
    cls, p = inference.analyse(model, meta, path.read_bytes()).top(1)[0]
    return cls, f"{100 * p:.1f}"


# ----------------------------------------------------------------------------- server and browser
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode})")
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not become healthy in {timeout:.0f} s")


def served_url(log: Path, proc: subprocess.Popen, timeout: float = 120) -> str:
    """The URL a starting ``streamlit run`` prints to ``log`` once it listens (RuntimeError if
    it exits first or says nothing in ``timeout`` s)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = re.search(r"URL: (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode})")
        time.sleep(0.2)
    raise RuntimeError(f"the server printed no URL in {timeout:.0f} s")


def start_server(env: dict[str, str] | None = None, args: list[str] | None = None) -> tuple[str, subprocess.Popen]:
    """``streamlit run dashboard.py`` (what ``make run`` starts) on a local port: (url, process).

    ``--server.port 0``: the server binds a port the system picks as it binds, so no port is
    chosen beforehand that another process could take in between (the server prints it; its
    output goes to a temporary log, removed by :func:`stop`)."""
    fd, name = tempfile.mkstemp(prefix="visattn-streamlit-", suffix=".log")
    log = Path(name)
    with os.fdopen(fd, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "dashboard.py", "--server.headless", "true",
             "--server.port", "0", "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
             *(args or [])],
            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    try:
        url = served_url(log, proc)
        wait_healthy(url, proc)
    except Exception as e:
        tail = log.read_text(errors="replace")[-2000:]
        stop(proc)
        raise RuntimeError(f"{e}; the server said:\n{tail}") from e
    return url, proc


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process started in its own session (its whole group); remove its log if
    :func:`start_server` made one."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=timeout)
    log = getattr(proc, "log", None)
    if log is not None:
        log.unlink(missing_ok=True)


def chrome(profile: Path):
    """Headless Chromium with background tabs not throttled (every tab is a user looking at it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-quic", "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})  # for a failing test's report
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    d.set_page_load_timeout(120)
    d.set_script_timeout(60)
    return d


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # elements come and go while Streamlit reruns
            pass
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def open_tab(driver, url: str, first: bool = False, timeout: float = 180) -> str:
    """A new tab (or the first one) on Explore in upload mode, watched by :data:`WATCH`: its handle."""
    from selenium.webdriver.common.by import By

    if not first:
        driver.switch_to.new_window("tab")
    driver.get(url)
    wait_for(lambda: "Explore" in driver.find_element(By.TAG_NAME, "h1").text, timeout, "the Explore page")
    upload_mode(driver, timeout)
    return driver.current_window_handle


def upload_mode(driver, timeout: float = 180) -> None:
    """Switch this tab's image source to "Upload an image" and watch it (:data:`WATCH`)."""
    from selenium.webdriver.common.by import By

    radio = wait_for(lambda: next((e for e in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stRadio"] label')
                                   if "Upload an image" in e.text), None), timeout, "the image-source choice")
    radio.click()
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, 'input[type="file"]'), timeout, "the uploader")
    driver.execute_script(WATCH)


@dataclass
class TabResult:
    """What one tab did and showed."""

    file: str
    latency: float | None  # seconds from choosing the file to the settled page (None: not settled)
    prediction: tuple[str, str] | None  # (class, "p.p") read from the page
    names_shown: list[str]  # tab_<i>.jpg names visible in the page
    errors: list[str]


def network_log(driver) -> list[str]:
    """The tab's websocket and request events since the last call (Chrome's performance log): what a
    failing test reports."""
    out = []
    for entry in driver.get_log("performance"):
        m = json.loads(entry["message"])["message"]
        if m["method"].startswith(("Network.webSocket", "Network.requestWillBeSent", "Network.loadingFailed",
                                   "Network.responseReceived")) and "Frame" not in m["method"]:
            p = m["params"]
            what = p.get("url") or p.get("request", {}).get("url") or p.get("response", {}).get("url") or ""
            detail = p.get("errorText") or p.get("response", {}).get("status") or ""
            out.append(f"{entry['timestamp'] / 1000:.3f} {m['method']} {what} {detail}")
    return out


def wait_reconnected(driver, timeout: float = 120) -> None:
    """Wait until this tab has opened a new websocket since :data:`WATCH` was run in it."""
    wait_for(lambda: driver.execute_script("return window.__va.opened > 0"), timeout, "the tab to reconnect")


def upload_all(driver, handles: list[str], files: list[Path]) -> None:
    """Give every tab its file, one after the other (a few ms apart)."""
    from selenium.webdriver.common.by import By

    for handle, path in zip(handles, files):
        driver.switch_to.window(handle)
        driver.find_element(By.CSS_SELECTOR, 'input[type="file"]').send_keys(str(path))


def collect(driver, handles: list[str], files: list[Path], timeout: float = 600) -> list[TabResult]:
    """Wait until every tab has settled (or ``timeout``), then read what each shows."""
    from selenium.webdriver.common.by import By

    deadline, pending = time.time() + timeout, set(handles)
    while pending and time.time() < deadline:
        for handle in list(pending):
            driver.switch_to.window(handle)
            if driver.execute_script("return window.__va && window.__va.t1 !== null"):
                pending.discard(handle)
        time.sleep(0.5)
    out = []
    for handle, path in zip(handles, files):
        driver.switch_to.window(handle)
        va = driver.execute_script("return window.__va")
        body = driver.find_element(By.TAG_NAME, "body").text
        m = PREDICTION.search(body)
        errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stAlertContentError"], '
                                                                        '[data-testid="stException"]')]
        latency = (va["t1"] - va["t0"]) / 1000 if va and va["t1"] is not None and va["t0"] is not None else None
        out.append(TabResult(path.name, latency, (m.group(1), m.group(2)) if m else None,
                             sorted(set(re.findall(r"tab_\d+\.jpg", body))), errors))
    return out


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, linear between order statistics."""
    v = sorted(values)
    k = (len(v) - 1) * q
    lo = int(k)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (k - lo)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) so far of process ``pid`` and its live descendants (Linux /proc)."""
    stats = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            stats[int(d.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo += [c for c, (ppid, _) in stats.items() if ppid == p and c not in tree]
    return sum(stats[p][1] for p in tree if p in stats) / os.sysconf("SC_CLK_TCK")


def round_of_tabs(driver, urls: list[str], files: list[Path], first: bool = True,
                  pids: dict[str, int] | None = None) -> tuple[list[TabResult], dict[str, float]]:
    """Open one tab per file (tab i on ``urls[i % len(urls)]``), upload all at once, collect.
    Also returns the CPU seconds each process tree of ``pids`` ({name: pid}) spent from the
    uploads until every tab settled (where the time goes: server or browser)."""
    handles = [open_tab(driver, urls[i % len(urls)], first=first and i == 0) for i in range(len(files))]
    before = {name: cpu_seconds(pid) for name, pid in (pids or {}).items()}
    upload_all(driver, handles, files)
    results = collect(driver, handles, files)
    return results, {name: cpu_seconds(pid) - before[name] for name, pid in (pids or {}).items()}


def close_tabs(driver) -> None:
    """Close every tab but one, which goes blank (its Streamlit session ends)."""
    handles = driver.window_handles
    for h in handles[1:]:
        driver.switch_to.window(h)
        driver.close()
    driver.switch_to.window(handles[0])
    driver.get("about:blank")


def summary(results: list[TabResult]) -> dict[str, float]:
    lat = [r.latency for r in results if r.latency is not None]
    return {"tabs": len(results), "settled": len(lat), "p50": statistics.median(lat) if lat else float("nan"),
            "p95": percentile(lat, 0.95) if lat else float("nan"), "max": max(lat) if lat else float("nan")}


def sweep(counts: list[int], workdir: Path, check: bool = False) -> list[dict[str, Any]]:
    """One server, one browser; for each count a fresh round of that many tabs (after one warm-up
    tab with another photo). Rows: p50/p95/max latency, the CPU seconds the server and the
    browser spent on the round (``server_cpu``, ``browser_cpu``), ``all_own`` (every tab showed
    exactly its own prediction and file name, and no error) and the ``failures``. ``check``: stop at the first
    round that fails."""
    *files, spare = photos(max(counts) + 1, workdir / "photos")
    expected = [expected_prediction(p) for p in files]
    url, proc = start_server(env={"OMP_NUM_THREADS": "1"})
    driver = chrome(workdir / "chrome")
    rows = []
    pids = {"server_cpu": proc.pid, "browser_cpu": driver.service.process.pid}
    try:
        round_of_tabs(driver, [url], [spare])  # warm-up: model load, first-call costs
        close_tabs(driver)
        for n in counts:
            results, cpu = round_of_tabs(driver, [url], files[:n], first=True, pids=pids)
            close_tabs(driver)
            failures = [(r, e) for r, e in zip(results, expected)
                        if not (r.prediction == e and r.names_shown == [r.file] and not r.errors)]
            rows.append({**summary(results), **cpu, "all_own": not failures, "failures": failures})
            if check and failures:
                break
    finally:
        driver.quit()
        stop(proc)
    return rows


def server_cpu_per_upload(files: list[Path], workdir: Path, args: list[str] | None = None) -> tuple[float, float]:
    """One server (one thread, ``args`` added to its command line) and one tab: the server's CPU
    seconds per upload and the median upload-to-settled latency over ``files[1:]`` (``files[0]``
    warms up)."""
    url, proc = start_server(env={"OMP_NUM_THREADS": "1"}, args=args)
    driver = chrome(workdir / "chrome")
    try:
        handle = open_tab(driver, url, first=True)
        upload_all(driver, [handle], files[:1])
        collect(driver, [handle], files[:1])
        before, latencies = cpu_seconds(proc.pid), []
        for path in files[1:]:
            driver.execute_script(WATCH)
            upload_all(driver, [handle], [path])
            latencies.append(collect(driver, [handle], [path])[0].latency)
        return (cpu_seconds(proc.pid) - before) / len(latencies), statistics.median(latencies)
    finally:
        driver.quit()
        stop(proc)


def _needs_browser_and_model() -> None:
    if not (HAVE_BROWSER and DEFAULT_CKPT.is_file()):
        raise FileNotFoundError("needs Debian's chromium, chromium-driver and checkpoints/sa_cnn.safetensors")


def bench_server_cpu(uploads: int = 8, rounds: int = 2) -> list[dict[str, Any]]:
    """``make bench``: the server's CPU per upload with the repository's config (no garbage
    collection after every rerun) against Streamlit's default (``--runner.postScriptGC true``),
    in alternating rounds; min over rounds."""
    _needs_browser_and_model()
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "gc": []}
    with tempfile.TemporaryDirectory() as tmp:
        files = photos(uploads + 1, Path(tmp) / "photos")
        for _ in range(rounds):
            runs["ours"].append(server_cpu_per_upload(files, Path(tmp) / "a"))
            runs["gc"].append(server_cpu_per_upload(files, Path(tmp) / "b", ["--runner.postScriptGC", "true"]))
    ours, gc = min(runs["ours"]), min(runs["gc"])
    return [{"what": "server CPU per upload, one tab (real server and Chromium, one thread)",
             "baseline": "Streamlit's default: a full garbage collection after every rerun",
             "seconds": ours[0], "baseline_seconds": gc[0], "ratio": ours[0] / gc[0],
             "target": f"median upload-to-settled {ours[1]:.2f} s against {gc[1]:.2f} s",
             "rounds": runs}]


def bench_tabs(counts: tuple[int, ...] = (1, 8, 16, 32)) -> list[dict[str, Any]]:
    """``make bench``: p50 and p95 upload-to-settled latency of N tabs at once, against one tab
    alone, all in one run (rows in ``benchmarks/run.py``'s format). Target: 16 tabs p95 <= 3× one tab."""
    _needs_browser_and_model()
    with tempfile.TemporaryDirectory() as tmp:
        rows = sweep(list(counts), Path(tmp))
    alone = next(r for r in rows if r["tabs"] == 1)["p50"]
    out = []
    for r in rows:
        note = (f"{r['settled']}/{r['tabs']} settled, each its own prediction: {r['all_own']}; "
                f"p50 {r['p50']:.2f} s, max {r['max']:.2f} s; CPU s: server {r['server_cpu']:.1f}, "
                f"browser {r['browser_cpu']:.1f}")
        if r["tabs"] == 16:
            note = "target p95 <= 3× one tab; " + note
        out.append({"what": f"{r['tabs']} browser tabs at once: p95 upload-to-settled", "baseline": "one tab alone",
                    "seconds": r["p95"], "baseline_seconds": alone, "ratio": r["p95"] / alone, "target": note,
                    "tabs": r["tabs"], "p50": r["p50"]})
    return out


if __name__ == "__main__":
    counts = [int(a) for a in sys.argv[1:]] or [1, 8, 16]
    with tempfile.TemporaryDirectory() as tmp:
        for row in sweep(counts, Path(tmp)):
            print(f"{row['tabs']:3d} tabs: p50 {row['p50']:.2f} s, p95 {row['p95']:.2f} s, max {row['max']:.2f} s, "
                  f"settled {row['settled']}/{row['tabs']}, each its own prediction: {row['all_own']}; "
                  f"CPU s server {row['server_cpu']:.1f}, browser {row['browser_cpu']:.1f}", flush=True)
