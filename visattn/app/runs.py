"""Background training runs of the Train page: the validated command line, the process
(in its own session) started and stopped, and the metrics and log files it writes."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from visattn import paths
from visattn.errors import VisattnError

TRAIN_MODELS = ("sa_cnn", "hybrid_vit", "cbam_cnn", "seed_cnn")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,47}")
MAX_EPOCHS = 50
MAX_RUNNING = 1  # background runs started from the dashboard at once (the CPUs are few)
_STARTED: dict[str, subprocess.Popen] = {}  # runs started by this process, until their lock shows them
_STARTED_LOCK = threading.RLock()
_LOCK_SUFFIX = ".safetensors.lock"


def model_overrides(model: str, width: int, heads: int, similarity: str, pos_encoding: str) -> dict[str, Any]:
    """The ``--set`` config of each trainable model for the Train page's few knobs."""
    if model == "sa_cnn":
        return {"widths": (width, 2 * width, 4 * width), "heads": heads, "similarity": similarity,
                "pos_encoding": pos_encoding}
    if model == "hybrid_vit":
        return {"embed_dim": 4 * width, "heads": heads}
    if model == "cbam_cnn":
        return {"widths": (2 * width, 4 * width, 8 * width), "stem_width": width}
    if model == "seed_cnn":
        return {}
    raise VisattnError(f"cannot train {model!r} here; choose one of {', '.join(TRAIN_MODELS)}")


def train_argv(name: str, model: str = "sa_cnn", epochs: int = 2, width: int = 32, heads: int = 4,
               similarity: str = "dot", pos_encoding: str = "sinusoidal", subset: int = 5000,
               eval_subset: int = 1000, data: str | os.PathLike | None = None,
               python: str = sys.executable) -> list[str]:
    """The command line of a training run writing ``runs/NAME.safetensors`` (validated)."""
    if not RUN_NAME.fullmatch(name or ""):
        raise VisattnError("run name: letters, digits, '-' and '_' only (at most 48)")
    if not 1 <= int(epochs) <= MAX_EPOCHS:
        raise VisattnError(f"epochs must be 1..{MAX_EPOCHS}")
    if model in ("sa_cnn", "hybrid_vit") and (4 * width if model == "hybrid_vit" else 2 * width) % heads:
        raise VisattnError(f"{heads} heads do not divide the attention width")
    argv = [python, "-m", "visattn", "train", "--model", model, "--epochs", str(int(epochs)),
            "--out", str(paths.runs() / f"{name}.safetensors"), "--data", str(data or paths.data())]
    if subset:
        argv += ["--subset", str(int(subset))]
    if eval_subset:
        argv += ["--eval-subset", str(int(eval_subset))]
    for key, value in model_overrides(model, width, heads, similarity, pos_encoding).items():
        text = "(" + ",".join(str(v) for v in value) + ")" if isinstance(value, tuple) else str(value)
        argv += ["--set", f"{key}={text}"]
    return argv


def run_files(name: str) -> dict[str, Path]:
    """``out``, ``metrics``, ``state`` and ``log`` paths of run ``name`` in ``runs/``."""
    from visattn.train import paths as train_paths

    p = train_paths(str(paths.runs() / f"{name}.safetensors"))
    return {**p, "log": paths.runs() / f"{name}.log"}


def running() -> dict[str, int]:
    """Training runs in ``runs/`` that are alive, by name: their pid.

    Read from the lock files (``NAME.safetensors.lock``: an flock holding the run's pid,
    released by the kernel when the process ends, see :func:`visattn.train.run_lock`), so
    a restarted server, or a second one, sees the runs any server or the CLI started.
    Runs this process started whose lock is not taken yet (the first seconds) count too.
    """
    from visattn.train import lock_holder

    found: dict[str, int] = {}
    if paths.runs().is_dir():
        for lock in paths.runs().glob("*" + _LOCK_SUFFIX):
            pid = lock_holder(lock.with_name(lock.name.removesuffix(".lock")))
            if pid is not None:
                found[lock.name.removesuffix(_LOCK_SUFFIX)] = pid
    with _STARTED_LOCK:
        for name, proc in list(_STARTED.items()):
            if proc.poll() is not None:
                del _STARTED[name]
            else:
                found.setdefault(name, proc.pid)
    return found


def start_training(name: str, argv: Sequence[str]) -> subprocess.Popen:
    """Start ``argv`` as a background process in its own session (process group), its
    output going to ``runs/NAME.log``. At most :data:`MAX_RUNNING` runs in ``runs/`` at a
    time (counted from the lock files: see :func:`running`); refused on a public server."""
    from visattn.serving import policy

    if not policy().train:
        raise VisattnError("training is off on this public server")
    with _STARTED_LOCK:  # one start at a time in this process
        alive = running()
        if name in alive:
            raise VisattnError(f"another process (pid {alive[name]}) is training run {name!r}; "
                               "stop it or choose another name")
        if len(alive) >= MAX_RUNNING:
            raise VisattnError(f"{len(alive)} run(s) already going ({', '.join(alive)}); stop it first")
        files = run_files(name)
        files["log"].parent.mkdir(parents=True, exist_ok=True)
        root = paths.root()
        path_list = [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path_list)}  # visattn importable from the repo
        with open(files["log"], "wb") as log:
            proc = subprocess.Popen(list(argv), cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        _STARTED[name] = proc
        return proc


def _signal(pid: int, sig: int) -> None:
    """``sig`` to the run's process group when it leads one (runs started here), else to it alone."""
    if os.getpgid(pid) == pid:
        os.killpg(pid, sig)
    else:
        os.kill(pid, sig)


def stop_training(name: str, grace: float = 5.0) -> bool:
    """Stop run ``name`` (SIGTERM, then SIGKILL after ``grace`` s), whichever process started
    it: its pid comes from its lock file. False if it is not running."""
    pid = running().get(name)
    if pid is None or pid <= 0:
        return False
    with _STARTED_LOCK:
        proc = _STARTED.pop(name, None)
    try:
        _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while name in running() or (proc is not None and proc.poll() is None):
            if time.monotonic() > deadline:
                _signal(pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    except ProcessLookupError:
        pass
    if proc is not None:
        proc.wait(timeout=5)  # our child: reap it
    return True


def metric_files() -> dict[str, Path]:
    """``{label: path}`` of every ``*.metrics.jsonl`` in ``runs/`` and ``checkpoints/``, newest first."""
    found = [p for folder in (paths.runs(), paths.checkpoints()) if folder.is_dir() for p in folder.glob("*.metrics.jsonl")]
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return {f"{p.parent.name}/{p.name.removesuffix('.metrics.jsonl')}": p for p in found}


def read_metrics(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step lines, epoch lines) of a metrics file being written: a half-written last
    line, blank lines and foreign lines are skipped; a missing file gives ([], [])."""
    steps, epochs = [], []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return steps, epochs
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            (epochs if rec.get("type") == "epoch" else steps if rec.get("type") == "step" else []).append(rec)
    return steps, epochs


def tail(path: str | os.PathLike, lines: int = 15, max_bytes: int = 16384) -> str:
    """The last ``lines`` lines of a (log) file, '' if absent; tqdm carriage returns folded."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    rows = [r.rsplit("\r", 1)[-1] for r in data.splitlines()]
    return "\n".join([r for r in rows if r.strip()][-lines:])
