"""The status file of a training run (``NAME.status.json`` beside its checkpoint): the
phase it is in (waiting for its turn, loading, training, evaluating, done, failed), how far along, and the
estimated seconds left, rewritten whole (atomically) so that a reader never sees half.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "r.status.json"
>>> status = StatusFile(path)
>>> status.write("training", done=30, total=120, eta=9.5, force=True)
>>> {k: read_status(path)[k] for k in ("phase", "done", "total", "eta")}
{'phase': 'training', 'done': 30, 'total': 120, 'eta': 9.5}
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from visattn.checkpoint import atomic_write

PHASES = ("waiting", "loading", "training", "evaluating", "done", "failed")


class StatusFile:
    """Writes one run's status; at most one write per ``min_interval`` seconds unless forced
    (phase changes are always written)."""

    def __init__(self, path: str | os.PathLike, min_interval: float = 0.5) -> None:
        self.path = Path(path)
        self.min_interval = min_interval
        self.started = time.time()
        self._last_write = 0.0
        self._phase = ""

    def write(self, phase: str, done: int = 0, total: int = 0, eta: float | None = None, message: str = "",
              force: bool = False, **extra: Any) -> None:
        """Record ``phase`` with ``done`` of ``total`` units and ``eta`` seconds left."""
        now = time.time()
        if not force and phase == self._phase and now - self._last_write < self.min_interval:
            return
        self._phase, self._last_write = phase, now
        record = {"phase": phase, "done": done, "total": total, "eta": eta, "message": message,
                  "elapsed": now - self.started, "updated": now, "pid": os.getpid(), **extra}
        atomic_write(self.path, json.dumps(record).encode())


def read_status(path: str | os.PathLike) -> dict[str, Any] | None:
    """The last status written to ``path``, or None if there is none (yet) or it is not a status."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("phase") in PHASES else None
