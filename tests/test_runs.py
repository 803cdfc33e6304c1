"""visattn.app.runs: training runs are found from their lock files, so a restarted server still
lists, limits and stops the runs an earlier server process started (real processes here)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from visattn.app import runs
from visattn.errors import VisattnError

# A stand-in for `visattn train`: takes the run's lock as train() does, then waits to be stopped.
HOLD = """
import sys, time
from pathlib import Path
from visattn.train import run_lock
with run_lock(Path(sys.argv[1])):
    print("training", flush=True)
    time.sleep(600)
"""

# The first server: starts the run through runs.start_training, then exits (a restart).
FIRST_SERVER = """
import sys
from pathlib import Path
import os
os.environ["VISATTN_RUNS"] = sys.argv[1]
from visattn.app import runs
proc = runs.start_training("restart_me", [sys.executable, "-c", sys.argv[2], str(Path(sys.argv[1]) / "restart_me.safetensors")])
print(proc.pid)
"""


def until(predicate, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_runs_outlive_the_server_that_started_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISATTN_RUNS", str(tmp_path))
    monkeypatch.setattr(runs, "_STARTED", {})
    monkeypatch.delenv("VISATTN_PUBLIC", raising=False)
    out = subprocess.run([sys.executable, "-c", FIRST_SERVER, str(tmp_path), HOLD], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    pid = int(out.stdout.split()[-1])  # the first server has exited; its run goes on
    try:
        until(lambda: runs.running() == {"restart_me": pid}, what="the run's lock")  # listed from its lock
        # its output goes to its log (printed just after the lock is taken: the run may not be there yet)
        until(lambda: (tmp_path / "restart_me.log").read_text() == "training\n", what="the run's line in its log")
        with pytest.raises(VisattnError, match=r"1 run\(s\) already going \(restart_me\)"):  # limited
            runs.start_training("another", [sys.executable, "-c", "pass"])
        with pytest.raises(VisattnError, match=f"another process \\(pid {pid}\\)"):
            runs.start_training("restart_me", [sys.executable, "-c", "pass"])
        assert runs.running() == {"restart_me": pid} and not (tmp_path / "another.log").exists()
        assert runs.stop_training("restart_me")  # stopped, though this process did not start it
        until(lambda: not alive(pid), 10, "the run to end")
        assert runs.running() == {} and runs.stop_training("restart_me") is False
    finally:
        if alive(pid):
            os.killpg(pid, 9)


def test_a_run_started_here_counts_before_it_takes_its_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISATTN_RUNS", str(tmp_path))
    monkeypatch.setattr(runs, "_STARTED", {})
    monkeypatch.delenv("VISATTN_PUBLIC", raising=False)
    proc = runs.start_training("slow_start", [sys.executable, "-c", "import time; time.sleep(600)"])  # never locks
    try:
        assert runs.running() == {"slow_start": proc.pid}
        with pytest.raises(VisattnError, match="already going"):
            runs.start_training("second", [sys.executable, "-c", "pass"])
        assert runs.stop_training("slow_start", grace=5) and proc.poll() is not None
        assert runs.running() == {}
    finally:
        if proc.poll() is None:
            proc.kill()


def test_only_the_lab_may_start_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISATTN_RUNS", str(tmp_path))
    monkeypatch.setenv("VISATTN_PUBLIC", "1")
    with pytest.raises(VisattnError, match="training is off on this public server"):
        runs.start_training("nope", [sys.executable, "-c", "pass"])
    assert list(tmp_path.iterdir()) == []


# A stand-in run for an experiment: prints its name, exits with the given status.
QUICK = "import sys; print(sys.argv[1], flush=True); sys.exit(int(sys.argv[2]))"


def test_an_experiment_runs_in_turn_and_stops_at_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISATTN_RUNS", str(tmp_path))
    monkeypatch.setattr(runs, "_STARTED", {})
    monkeypatch.delenv("VISATTN_PUBLIC", raising=False)
    plan = [(name, [sys.executable, "-c", QUICK, name, code]) for name, code in (("a", "0"), ("b", "3"), ("c", "0"))]
    proc = runs.start_in_turn(plan)
    assert proc.wait(timeout=120) == 3  # b failed: its status ends the sequence
    assert (tmp_path / "a.log").read_text() == "a\n" and (tmp_path / "b.log").read_text() == "b\n"
    assert not (tmp_path / "c.log").exists()
    assert (tmp_path / "a.log").stat().st_mtime <= (tmp_path / "b.log").stat().st_mtime
    assert runs.running() == {}


def test_unwritable_runs_folder_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("VISATTN_RUNS", str(tmp_path / "file" / "runs"))
    monkeypatch.setattr(runs, "_STARTED", {})
    monkeypatch.delenv("VISATTN_PUBLIC", raising=False)
    with pytest.raises(VisattnError, match="cannot write the run's files in .*file/runs"):
        runs.start_training("x", [sys.executable, "-c", "pass"])
