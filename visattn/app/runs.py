"""Background training runs of the Train page: the validated command line, the process
(in its own session) started and stopped, and the metrics and log files it writes."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
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
    if model == "sa_cnn":  # the stride-2 whitening stem: 16×16 from the start, attention on the 8×8 grid
        return {"widths": (width, 2 * width), "attn_stages": (0,), "stem_stride": 2, "heads": heads,
                "similarity": similarity, "pos_encoding": pos_encoding, "gate_init": FORM_GATE,
                "temperature_init": FORM_TEMPERATURE}
    if model == "hybrid_vit":
        return {"embed_dim": 4 * width, "heads": heads}
    if model == "cbam_cnn":
        return {"widths": (2 * width, 4 * width, 8 * width), "stem_width": width}
    if model == "seed_cnn":
        return {}
    raise VisattnError(f"cannot train {model!r} here; choose one of {', '.join(TRAIN_MODELS)}")


#: The Train form's defaults: a small sa_cnn (about 5 M multiply-adds an image: a stride-2
#: stem, one attention head, about 950 training images per CPU-second on one thread) with cosine
#: similarity and relative positions, on every training image. Attention starts almost uniform and
#: learns where to look within the run (see FORM_TEMPERATURE); ``make bench`` measures the run's time,
#: test accuracy and probe entropy.
DEFAULT_FORM: dict[str, Any] = {"model": "sa_cnn", "epochs": 3, "width": 32, "heads": 1, "similarity": "cosine",
                                "pos_encoding": "relative", "subset": 50000, "eval_subset": 0}
#: The residual gate the form's sa_cnn starts with: attention counts from the first step, so
#: its queries and keys get gradient (dot product, about 80 steps: probe entropy 4.11 at gate 0.1,
#: 4.02 at gate 1, of log 64 = 4.16).
FORM_GATE = 1.0
#: Cosine similarity starts at temperature 1 (rows almost uniform: probe entropy 4.15 of 4.16), and
#: the temperature and relative-position table learn at FORM_ATTN_LR_SCALE times the learning rate,
#: so what attention learns to look at shows within the run (at 1x, 3 epochs moved the temperature
#: from 1.00 to 1.07 and the entropy stayed at 4.14).
FORM_TEMPERATURE = 1.0
FORM_ATTN_LR_SCALE = 1000.0
MIN_IMAGES = 512  # one batch


def train_argv(name: str, model: str = DEFAULT_FORM["model"], epochs: int = DEFAULT_FORM["epochs"],
               width: int = DEFAULT_FORM["width"], heads: int = DEFAULT_FORM["heads"],
               similarity: str = DEFAULT_FORM["similarity"], pos_encoding: str = DEFAULT_FORM["pos_encoding"],
               subset: int = DEFAULT_FORM["subset"], eval_subset: int = DEFAULT_FORM["eval_subset"],
               data: str | os.PathLike | None = None, probe: str = "0", python: str = sys.executable) -> list[str]:
    """The command line of a training run writing ``runs/NAME.safetensors`` (validated);
    ``probe`` is the probe image, a test-set index or an image file."""
    if not RUN_NAME.fullmatch(name or ""):
        raise VisattnError("run name: letters, digits, '-' and '_' only (at most 48)")
    if not 1 <= int(epochs) <= MAX_EPOCHS:
        raise VisattnError(f"epochs must be 1..{MAX_EPOCHS}")
    if int(subset) < MIN_IMAGES:
        raise VisattnError(f"training images: at least {MIN_IMAGES} (one batch), got {int(subset)}")
    if model in ("sa_cnn", "hybrid_vit") and (4 * width if model == "hybrid_vit" else width) % heads:
        raise VisattnError(f"{heads} heads do not divide the attention width")
    argv = [python, "-m", "visattn", "train", "--model", model, "--epochs", str(int(epochs)),
            "--out", str(paths.runs() / f"{name}.safetensors"), "--data", str(data or paths.data()),
            "--probe", str(probe)]
    argv += ["--subset", str(int(subset))]  # all of them when it is the split's size or more
    if model == "sa_cnn":
        argv += ["--attn-lr-scale", str(FORM_ATTN_LR_SCALE)]
    if eval_subset:
        argv += ["--eval-subset", str(int(eval_subset))]
    for key, value in model_overrides(model, width, heads, similarity, pos_encoding).items():
        text = "(" + ",".join(str(v) for v in value) + ",)" if isinstance(value, tuple) else str(value)
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
        alive = check_free([name])
        if len(alive) >= MAX_RUNNING:
            raise VisattnError(f"{len(alive)} run(s) already going ({', '.join(alive)}); stop it first")
        files = run_files(name)
        root = paths.root()
        path_list = [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path_list)}  # visattn importable from the repo
        try:
            _announce(name, "loading", "starting Python")  # the watch view can show the run at once
            with open(files["log"], "wb") as log:
                proc = subprocess.Popen(list(argv), cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        except OSError as e:
            raise VisattnError(f"cannot write the run's files in {files['log'].parent}: {e.strerror or e}") from None
        _STARTED[name] = proc
        return proc


def check_free(names: Sequence[str]) -> dict[str, int]:
    """Refuse (one line) if one of ``names`` is training; else the runs that are (:func:`running`)."""
    alive = running()
    for name in names:
        if name in alive:
            raise VisattnError(f"another process (pid {alive[name]}) is training run {name!r}; "
                               "stop it or choose another name")
    return alive


def start_in_turn(plan: Sequence[tuple[str, Sequence[str]]]) -> subprocess.Popen:
    """Start the runs of ``plan`` (``[(name, argv)]``: an experiment) one after the other in
    one background process; each writes its own log, and a run that fails or is stopped
    ends the sequence. Refused like :func:`start_training` if any of the names is training."""
    check_free([name for name, _ in plan])
    logs = [[str(run_files(name)["log"]), list(argv)] for name, argv in plan]
    proc = start_training(plan[0][0], [sys.executable, "-m", __name__, json.dumps(logs)])
    for (before, _), (name, _) in zip(plan, plan[1:]):
        _announce(name, "waiting", f"starts when {before} has finished")
    return proc


def _announce(name: str, phase: str, message: str) -> None:
    """An empty metrics file and a first status for run ``name``, before its process writes them."""
    from visattn.checkpoint import atomic_write
    from visattn.progress import StatusFile

    files = run_files(name)
    files["metrics"].parent.mkdir(parents=True, exist_ok=True)
    atomic_write(files["metrics"], b"")
    StatusFile(files["status"]).write(phase, message=message, force=True)


def _run_in_turn(plan: Sequence[tuple[str, Sequence[str]]]) -> int:
    """Run each ``(log file, argv)`` of ``plan`` in turn; the exit status of the first that
    fails (or is stopped), else 0."""
    for log, argv in plan:
        with open(log, "wb") as out:
            code = subprocess.run(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        if code:
            return code
    return 0


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


def run_label(name: str) -> str:
    """The label of run ``name`` among :func:`metric_files` ("runs/NAME")."""
    return f"{paths.runs().name}/{name}"


def run_name(label: str) -> str | None:
    """The run name of a :func:`metric_files` label in ``runs/`` (None for other folders)."""
    folder, _, name = label.partition("/")
    return name if folder == paths.runs().name else None


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


@dataclass
class RunRecord:
    """What a run has written so far: its metric lines and its status (None before any)."""

    steps: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    status: dict[str, Any] | None

    @property
    def probe_image(self) -> str:
        """The probe image: a test-set index or an image file ("0" for runs that do not say)."""
        return next((str(r["probe_image"]) for r in self.steps if "probe_image" in r), "0")

    def probes(self) -> list[tuple[int, dict[str, dict[str, Any]]]]:
        """``[(step, {layer: {"received": map, "entropy": ..., "uniform": ...}})]`` in step order,
        from step and epoch lines (older runs' single map becomes one layer, "attention")."""
        found = {}
        for r in sorted(self.steps + self.epochs, key=lambda r: (r.get("step", 0), r.get("type") == "epoch")):
            p = r.get("probe")
            if isinstance(p, list):
                p = {"attention": {"received": p}}
            if isinstance(p, dict) and p:
                found[int(r.get("step", r.get("epoch", 0)))] = p
        return sorted(found.items())

    def entropy(self) -> dict[str, tuple[list[int], list[float], float]]:
        """``{layer: (steps, mean entropies, uniform's log N)}`` of the probes that measured it."""
        out: dict[str, tuple[list[int], list[float], float]] = {}
        for step, layers in self.probes():
            for name, v in layers.items():
                if "entropy" in v:
                    xs, ys, _ = out.setdefault(name, ([], [], v["uniform"]))
                    xs.append(step)
                    ys.append(v["entropy"])
        return out


def progress_line(status: dict[str, Any] | None, alive: bool) -> tuple[float, str]:
    """(fraction done, one line) for a progress bar from a run's status; ``alive``: whether
    its process still runs (a run killed mid-way leaves its last status behind).

    >>> progress_line({"phase": "training", "done": 30, "total": 120, "eta": 75.0, "epoch": 1, "epochs": 3}, True)
    (0.25, 'training: epoch 1 of 3, step 30 of 120 · about 1 min 15 s left')
    >>> progress_line({"phase": "training", "done": 30, "total": 120, "eta": 75.0}, False)[1]
    'stopped at step 30 of 120'
    """
    if not status:
        return 0.0, "starting…"
    phase, done, total = status["phase"], status.get("done") or 0, status.get("total") or 0
    fraction = min(1.0, done / total) if total else 0.0
    if phase in ("done", "failed", "waiting"):
        return (1.0 if phase == "done" else fraction), f"{phase}: {status.get('message') or ''}".rstrip(": ")
    if not alive:
        return fraction, f"stopped at step {done} of {total}" if phase != "loading" else "stopped while loading"
    if phase == "loading":
        return fraction, f"{status.get('message') or 'loading'}: {done:,} of {total:,}" if total else "starting…"
    eta = status.get("eta")
    left = "" if eta is None else f" · about {int(eta // 60)} min {int(eta % 60)} s left" if eta >= 60 else \
        f" · about {int(eta)} s left"
    where = f"epoch {status.get('epoch')} of {status.get('epochs')}, " if status.get("epochs") else ""
    return fraction, f"{phase}: {where}step {done} of {total}{left}"


def save_probe_image(name: str, data: bytes) -> Path:
    """Check an image (the probe a teacher chose) and keep it as ``runs/NAME.probe.png``."""
    from visattn.checkpoint import atomic_write
    from visattn.image_io import load_image

    buf = io.BytesIO()
    load_image(data).convert("RGB").save(buf, "PNG")
    path = paths.runs() / f"{name}.probe.png"
    atomic_write(path, buf.getvalue())
    return path


def probe_picture(spec: str, test_split=None):
    """The probe image of a run as (32, 32, 3) uint8: test image ``spec`` of ``test_split``, or
    a probe file the dashboard saved in ``runs/``; None when it cannot be shown."""
    from visattn.image_io import image_to_uint8_array, load_image

    if spec.isdigit():
        if test_split is None or int(spec) >= len(test_split):
            return None
        return test_split.images[int(spec)].permute(1, 2, 0).numpy()
    path = Path(spec).resolve()
    if path.parent != paths.runs().resolve() or not path.is_file():  # only what the dashboard itself saved
        return None
    return image_to_uint8_array(load_image(path), 32)


def read_run(metrics: str | os.PathLike) -> RunRecord:
    """The :class:`RunRecord` of the run whose metrics file is ``metrics`` (status beside it)."""
    from visattn.progress import read_status

    path = Path(metrics)
    steps, epochs = read_metrics(path)
    return RunRecord(steps, epochs, read_status(path.with_name(path.name.removesuffix(".metrics.jsonl") + ".status.json")))


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


if __name__ == "__main__":  # the process start_in_turn starts
    sys.exit(_run_in_turn(json.loads(sys.argv[1])))
