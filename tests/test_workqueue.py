"""visattn.workqueue: slow jobs of many sessions, one (or a few) at a time, in arrival order."""
from __future__ import annotations

import doctest
import threading
import time

import pytest

from visattn import workqueue
from visattn.errors import VisattnError
from visattn.workqueue import BusyError, WorkQueue


def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class Job(threading.Thread):
    """A session's job: waits for a slot, records when it got it, holds it until released."""

    def __init__(self, q: WorkQueue, session: str, log: list[str], **kw) -> None:
        super().__init__(daemon=True)
        self.q, self.session, self.log, self.kw = q, session, log, kw
        self.release, self.started, self.error = threading.Event(), threading.Event(), None
        self.waits: list[int] = []

    def run(self) -> None:
        try:
            with self.q.slot(self.session, on_wait=self.waits.append, **self.kw):
                self.log.append(self.session)
                self.started.set()
                self.release.wait(10)
        except BaseException as e:  # noqa: BLE001 - recorded for the test
            self.error = e


def test_one_at_a_time_first_come_first_served() -> None:
    q, log = WorkQueue(workers=1, per_session=1), []
    jobs = [Job(q, s, log) for s in ("a", "b", "c")]
    for i, job in enumerate(jobs):  # a runs; b, then c, queue behind it
        job.start()
        until(lambda: sum(q.busy()) == i + 1)
    assert q.busy() == (1, 2) and log == ["a"]
    for i, job in enumerate(jobs):
        assert job.started.is_set() and not any(j.started.is_set() for j in jobs[i + 1:])
        # each waiting job has been told its turn before the running one ends (it may be woken late)
        until(lambda: all(j.waits[-1:] == [k + 1] for k, j in enumerate(jobs[i + 1:])))
        job.release.set()
        job.join(5)
        if i + 1 < len(jobs):
            assert jobs[i + 1].started.wait(5)
    assert log == ["a", "b", "c"] and q.busy() == (0, 0)
    assert jobs[0].waits == [] and jobs[1].waits == [1] and jobs[2].waits == [2, 1]  # turns still to wait
    assert all(j.error is None for j in jobs)


def test_a_session_cannot_queue_more_than_its_share() -> None:
    q, log = WorkQueue(workers=1, per_session=1), []
    first = Job(q, "alice", log)
    first.start()
    assert first.started.wait(5)
    with pytest.raises(BusyError, match="already have 1 slow computation"):
        with q.slot("alice"):
            pass
    other = Job(q, "bob", log)  # another session still queues
    other.start()
    until(lambda: q.busy() == (1, 1))
    first.release.set()
    assert other.started.wait(5)
    other.release.set()
    other.join(5)
    with q.slot("alice"):  # alice's share is free again
        assert q.busy() == (1, 0)
    assert issubclass(BusyError, VisattnError)


def test_a_full_queue_and_a_timeout_refuse_in_one_line_and_leave_the_line() -> None:
    q, log = WorkQueue(workers=1, per_session=1, max_waiting=1), []
    holder, waiter = Job(q, "a", log), Job(q, "b", log)
    holder.start()
    assert holder.started.wait(5)
    waiter.start()
    until(lambda: q.busy() == (1, 1))
    with pytest.raises(BusyError, match="server is busy"):
        with q.slot("c"):
            pass
    holder.release.set()
    assert waiter.started.wait(5)
    late = Job(q, "d", log, timeout=0.2)
    late.start()
    late.join(5)
    assert isinstance(late.error, BusyError) and "\n" not in str(late.error)
    assert q.busy() == (1, 0) and log == ["a", "b"]  # the timed-out job left the line and never ran
    waiter.release.set()
    waiter.join(5)
    assert q.busy() == (0, 0)


def test_an_exception_in_the_job_frees_its_slot() -> None:
    q = WorkQueue()
    with pytest.raises(RuntimeError):
        with q.slot("a"):
            raise RuntimeError("boom")
    assert q.busy() == (0, 0)
    with q.slot("a"):
        pass


def test_workers_bound_the_concurrency() -> None:
    q, lock, now, peak = WorkQueue(workers=2, per_session=1), threading.Lock(), [0], [0]
    pair = threading.Barrier(2, timeout=5)  # two jobs must be inside at once, or this breaks

    def job(session: str) -> None:
        with q.slot(session):
            with lock:
                now[0] += 1
                peak[0] = max(peak[0], now[0])
            pair.wait()
            with lock:
                now[0] -= 1

    threads = [threading.Thread(target=job, args=(f"s{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert peak[0] == 2 and not pair.broken and q.busy() == (0, 0)


def test_bad_arguments_and_docstring() -> None:
    with pytest.raises(ValueError):
        WorkQueue(workers=0)
    assert doctest.testmod(workqueue).failed == 0
