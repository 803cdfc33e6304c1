"""Many users: N concurrent Explore sessions of dashboard.py in one process, each with its own image.

A Streamlit server runs every session's script in its own thread of one process: the
model (``st.cache_resource``) and the caches are shared, ``st.session_state`` is not.
Here each session is a ``streamlit.testing.v1.AppTest`` of dashboard.py driven from
its own thread; a ``threading.Barrier`` starts the N page loads together, then the N
uploads together. A session:

1. opens the dashboard (Explore) with the image source on "Upload an image" and the
   sidebar model on "Path on the server" = a frozen copy of the checkpoint (training
   rewrites checkpoints/sa_cnn.safetensors every epoch; the copy keeps every session and
   the expected values on one model, under a cache key no earlier run has used);
2. sets its own query point (``st.session_state["query_yx"]``, the documented hook), turns
   on the interactive (plotly) similarity maps, whose numbers can be read back, and
   uploads its own image through the real ``st.file_uploader``; the time of this run
   (bytes in, page with prediction, top-k chart, overlays and similarity maps out) is the
   session's latency.

What a session shows is read back from its element tree: the prediction line, the top-k
chart's classes and percentages, and the four similarity heatmaps (weights, q·k, cosine,
softmax) of the selected layer at its query; see :class:`SessionResult`.

AppTest is written for one run at a time: each run installs its own mock Runtime as the
process-wide singleton and removes it at the end, resets the process-wide "pages
directory" flag, patches ``config.get_option`` with ``unittest.mock.patch``, and compiles
the scripts afresh (its own ScriptCache per run). Run concurrently, those interleave: a
run finishing removes the Runtime under another run's ``st.image``; overlapping patches
restore each other's mocks and leak them past the test; 20 threads compiling at once hit
CPython 3.11's "AST constructor recursion depth mismatch" (gh-106905: ``ast`` keeps its
recursion counter per interpreter, not per thread). :func:`concurrent_apptest` makes them
what they are in a real server: one Runtime (media files, caches) and one ScriptCache
(each script compiled once, under its lock) for all sessions, the flag False as after a
server's first ``st.navigation``, the config patched once around all runs. Nothing of
the app or of the sessions' own state is touched.

    python -m benchmarks.sessions          # prints the rows; `benchmarks.run` may register bench_sessions
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import shutil
import statistics
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from visattn import paths

ROOT = paths.root()
DATA = paths.data()
DEFAULT_CKPT = paths.default_checkpoint()

UPLOAD_MODE = "Upload an image"  # pages/_state.py IMAGE_SOURCES[1]
PATH_MODE = "Path on the server"  # pages/_pickers.py MODEL_SOURCES[2]
TIMEOUT = 120.0  # seconds per AppTest run (20 sessions share two busy cores)


# ----------------------------------------------------------------------------- inputs
def cifar_images(per_class: int = 2, start: int = 1, data: Path = DATA) -> list[tuple[str, bytes]]:
    """``per_class`` real CIFAR-10 test JPEGs of every class, ``(class/file, bytes)``, the
    files ``start``, ``start + 1``, ... of each class folder in name order."""
    out = []
    for folder in sorted(p for p in (data / "test").iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        out += [(f"{folder.name}/{p.name}", p.read_bytes()) for p in files[start:start + per_class]]
    return out


def query_for(i: int, n: int) -> tuple[float, float]:
    """A different relative (y, x) query for each of ``n`` sessions (distinct rows when
    ``n`` is coprime with 7)."""
    return (((7 * i) % n + 0.5) / n, ((3 * i + 1) % n + 0.5) / n)


def frozen_checkpoint(folder: Path, source: Path = DEFAULT_CKPT) -> Path:
    """A copy of the checkpoint that training cannot rewrite under the sessions."""
    dst = folder / "sessions_model.safetensors"
    shutil.copyfile(source, dst)
    return dst


# ----------------------------------------------------------------------------- AppTest, concurrently
@contextlib.contextmanager
def concurrent_apptest() -> Iterator[Any]:
    """Let AppTest runs overlap in threads: one shared mock Runtime and ScriptCache, the
    pages-directory flag held False, the config patched once (see the module docstring). Yields
    the shared Runtime; restores everything on exit."""
    from unittest.mock import MagicMock

    from streamlit.components.v2.component_manager import BidiComponentManager
    from streamlit.runtime import Runtime
    from streamlit.runtime.caching.storage.dummy_cache_storage import MemoryCacheStorageManager
    from streamlit.runtime.dataframe_source_manager import DataframeSourceManager
    from streamlit.runtime.media_file_manager import MediaFileManager
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.runtime.scriptrunner.script_cache import ScriptCache
    from streamlit.testing.v1 import app_test, local_script_runner
    from streamlit.testing.v1.util import patch_config_options

    runtime = MagicMock(spec=Runtime)
    runtime.media_file_mgr = MediaFileManager(MemoryMediaFileStorage("/mock/media"))
    runtime.dataframe_source_mgr = DataframeSourceManager()
    runtime.cache_storage_manager = MemoryCacheStorageManager()
    bidi = BidiComponentManager()
    bidi.discover_and_register_components(start_file_watching=False)
    runtime.bidi_component_registry = bidi

    class RunLocalPagesManager(PagesManager):
        """AppTest's per-run ``PagesManager.uses_pages_directory = None`` lands on this
        subclass; the flag that ScriptRunner reads (on PagesManager) stays False."""

    script_cache = ScriptCache()  # a server's Runtime owns one; AppTest makes two per run
    saved_methods = {name: Runtime.__dict__[name] for name in ("instance", "exists")}
    saved_flag = PagesManager.uses_pages_directory
    saved_pm, saved_patch = app_test.PagesManager, app_test.patch_config_options
    saved_caches = app_test.ScriptCache, local_script_runner.ScriptCache
    Runtime.instance = classmethod(lambda cls: runtime)
    Runtime.exists = classmethod(lambda cls: True)
    PagesManager.uses_pages_directory = False
    app_test.PagesManager = RunLocalPagesManager
    app_test.patch_config_options = lambda overrides: contextlib.nullcontext()
    app_test.ScriptCache = local_script_runner.ScriptCache = lambda: script_cache
    try:
        # showErrorDetails: an exception element carries its message and trace (the
        # default, "none", redacts them), so that a failing session says why.
        with patch_config_options({"global.appTest": True, "client.showErrorDetails": "full"}):
            yield runtime
    finally:
        app_test.PagesManager, app_test.patch_config_options = saved_pm, saved_patch
        app_test.ScriptCache, local_script_runner.ScriptCache = saved_caches
        PagesManager.uses_pages_directory = saved_flag
        for name, method in saved_methods.items():
            setattr(Runtime, name, method)
        Runtime._instance = None


# ----------------------------------------------------------------------------- one session
@dataclass
class SessionResult:
    """What one session did and showed."""

    index: int
    name: str  # the uploaded file's name (class/file.jpg)
    sha: str  # sha256 of the uploaded bytes
    query_yx: tuple[float, float]  # the query this session set
    open_s: float = float("nan")  # first run: the Explore page, no image yet
    upload_s: float = float("nan")  # the upload's run: prediction, charts, overlays, maps
    failure: str | None = None  # a Python exception escaping AppTest (with traceback)
    exceptions: list[str] = field(default_factory=list)  # st.exception elements
    errors: list[str] = field(default_factory=list)  # st.error elements
    prediction: str | None = None  # the "Predicted **cls** (p%)" line
    topk_classes: list[str] = field(default_factory=list)  # top-k chart, best first
    topk_percent: np.ndarray | None = None
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)  # similarity figure: name -> (H, W)
    layer: str | None = None  # session state: the layer of the similarity maps
    head: str | None = None  # session state: "mean of heads" or "head i"
    state_query_yx: tuple[float, float] | None = None  # session state after the run
    state_upload: tuple[str, str] | None = None  # session state "uploaded_image": (name, sha)
    images: int = 0  # st.image elements (overlay grid, averaged/rollout overlays)

    @property
    def total_s(self) -> float:
        return self.open_s + self.upload_s

    @property
    def ok(self) -> bool:
        return self.failure is None and not self.exceptions and not self.errors


def plotly_array(value: Any) -> np.ndarray:
    """A plotly JSON array: a list, or plotly 6+'s ``{"dtype", "bdata", "shape"}``."""
    if isinstance(value, dict) and "bdata" in value:
        a = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        if shape:
            a = a.reshape([int(s) for s in (shape.split(",") if isinstance(shape, str) else shape)])
        return a
    return np.asarray(value)


def read_back(at, r: SessionResult) -> None:
    """Fill ``r`` from the session's element tree and session state."""
    r.exceptions = [f"{e.message}\n{e.value}\n" + "\n".join(e.stack_trace) for e in at.exception]
    r.errors = [e.value for e in at.error]
    r.prediction = next((m.value for m in at.markdown if m.value.startswith("Predicted **")), None)
    r.images = len(at.image)
    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        if chart.proto.id.endswith("-explore_topk"):
            r.topk_classes = [str(c) for c in spec["layout"]["yaxis"]["ticktext"]]
            r.topk_percent = plotly_array(spec["data"][0]["x"]).astype(np.float64)
        elif chart.proto.id.endswith("-explore_similarity"):
            r.heatmaps = {d["name"]: plotly_array(d["z"]) for d in spec["data"] if d.get("type") == "heatmap"}
    state = at.session_state
    r.layer = state["layer"] if "layer" in state else None
    r.head = state["head"] if "head" in state else None
    r.state_query_yx = tuple(state["query_yx"]) if "query_yx" in state else None
    up = state["uploaded_image"] if "uploaded_image" in state else None
    r.state_upload = None if up is None else (up.name, up.sha)


def new_session(checkpoint: Path, timeout: float = TIMEOUT):
    """An AppTest of dashboard.py set, before its first run, to upload mode and to the
    checkpoint at ``checkpoint`` (sidebar "Path on the server")."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "dashboard.py"), default_timeout=timeout)
    at.session_state["image_source"] = UPLOAD_MODE
    at.session_state["model_source"] = PATH_MODE
    at.session_state["checkpoint_path"] = str(checkpoint)
    at.session_state["explore_interactive"] = True  # plotly similarity maps: their numbers can be read back
    return at


def run_session(index: int, name: str, data: bytes, yx: tuple[float, float], checkpoint: Path,
                barrier: threading.Barrier | None = None, timeout: float = TIMEOUT) -> SessionResult:
    """One user: open Explore, set the query, upload ``data``. With a ``barrier``, wait on
    it before the page load and again before the upload (a session that failed still
    waits, so that the others are not held up)."""
    r = SessionResult(index, name, hashlib.sha256(data).hexdigest(), yx)
    at = None

    def wait() -> None:
        if barrier is not None:
            try:
                barrier.wait(timeout=timeout)
            except threading.BrokenBarrierError:
                pass

    try:
        at = new_session(checkpoint, timeout)
    except Exception:
        r.failure = traceback.format_exc()
    wait()
    if r.failure is None:
        try:
            t = time.perf_counter()
            at.run()
            r.open_s = time.perf_counter() - t
            if at.exception:
                read_back(at, r)
                raise RuntimeError("the page failed to open:\n" + "\n".join(r.exceptions))
        except Exception:
            r.failure = traceback.format_exc()
    wait()
    if r.failure is None:
        try:
            at.session_state["query_yx"] = yx
            at.file_uploader(key="explore_upload").set_value((name.replace("/", "_"), data, "image/jpeg"))
            t = time.perf_counter()
            at.run()
            r.upload_s = time.perf_counter() - t
            read_back(at, r)
        except Exception:
            r.failure = traceback.format_exc()
    return r


def run_sessions(images: list[tuple[str, bytes]], checkpoint: Path, timeout: float = TIMEOUT,
                 queries: list[tuple[float, float]] | None = None) -> list[SessionResult]:
    """One session per image, all at once (one thread each, started together by a
    barrier). Call inside :func:`concurrent_apptest`. Results in the order of ``images``."""
    n = len(images)
    queries = queries or [query_for(i, n) for i in range(n)]
    barrier = threading.Barrier(n)
    results: list[SessionResult | None] = [None] * n

    def user(i: int) -> None:
        name, data = images[i]
        results[i] = run_session(i, name, data, queries[i], checkpoint, barrier, timeout)

    threads = [threading.Thread(target=user, args=(i,), name=f"session-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def describe(results: list[SessionResult]) -> str:
    """min/median/max of the sessions' upload latency and wall time, one line each."""
    lines = []
    for what, values in (("upload latency", [r.upload_s for r in results]),
                         ("session wall time (open + upload)", [r.total_s for r in results])):
        s = spread(values)
        lines.append(f"{len(results)} concurrent sessions, {what}: min {s['min']:.2f} s, "
                     f"median {s['median']:.2f} s, max {s['max']:.2f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- benchmark
def bench_sessions(n: int = 20, alone: int = 3) -> list[dict]:
    """``n`` concurrent Explore sessions, each uploading its own CIFAR-10 test image:
    the median and the slowest (p100) upload latency, against a session alone (median of
    ``alone`` single sessions, after one warm-up session), all measured in this run.

    Rows are in ``benchmarks/run.py``'s format (what, baseline, seconds, baseline_seconds,
    ratio, target: here a note with the spread); they also carry ``min_seconds`` and ``sessions``.
    """
    if not DEFAULT_CKPT.is_file():
        raise FileNotFoundError(f"{DEFAULT_CKPT} is absent (make train-default)")
    per_class = -(-n // 10)
    images = cifar_images(per_class=per_class, start=1)[:n]
    if len(images) < n:
        raise FileNotFoundError(f"need {n} CIFAR-10 test images under {DATA / 'test'}, found {len(images)}")
    spare = cifar_images(per_class=1, start=1 + per_class)  # never uploaded by the n sessions
    with tempfile.TemporaryDirectory() as tmp, concurrent_apptest():
        ckpt = frozen_checkpoint(Path(tmp))
        warm = run_session(-1, *spare[0], (0.5, 0.5), ckpt)  # model load, imports, first-call costs
        singles = [run_session(-2 - k, *spare[1 + k], (0.5, 0.5), ckpt) for k in range(alone)]
        results = run_sessions(images, ckpt)
    bad = [r for r in [warm, *singles, *results] if not r.ok or r.prediction is None]
    if bad:
        r = bad[0]
        raise RuntimeError(f"{len(bad)} session(s) failed; {r.name}: {r.failure or r.exceptions or r.errors}")
    base = statistics.median(r.upload_s for r in singles)
    s = spread([r.upload_s for r in results])
    # Notes, not targets: one process runs every session's Python under one GIL, so n
    # uploads at once cost each user about the sum of their work (n × alone).
    note = (f"spread {s['min']:.1f}–{s['max']:.1f} s over {n} sessions; "
            f"{n} × alone = {n * base:.1f} s (fully serialised); no session failed")
    row = {"baseline": "one session alone", "baseline_seconds": base, "min_seconds": s["min"], "sessions": n,
           "target": note}
    return [
        {"what": f"{n} concurrent Explore sessions: median upload latency", **row, "seconds": s["median"],
         "ratio": s["median"] / base},
        {"what": f"{n} concurrent Explore sessions: max (p100) upload latency", **row, "seconds": s["max"],
         "ratio": s["max"] / base},
    ]


if __name__ == "__main__":
    from benchmarks.table import fmt

    for row in bench_sessions():
        print(fmt(row))
