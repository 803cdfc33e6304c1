"""A first-come, first-served queue for slow computations shared by many users.

One server process runs every browser session in its own thread. A :class:`WorkQueue`
lets at most ``workers`` slow jobs (integrated gradients, occlusion, the sanity check)
run at once, in arrival order, and refuses a session more than ``per_session`` jobs
queued or running, so one user cannot starve the rest. Plain threading, no Streamlit.

>>> q = WorkQueue(workers=1, per_session=1)
>>> with q.slot("alice"):
...     q.busy()
(1, 0)
>>> q.busy()
(0, 0)
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from typing import Callable, Iterator

from visattn.errors import VisattnError


class BusyError(VisattnError):
    """A slow job refused: this session already has its share queued, or the queue is full."""


class WorkQueue:
    """At most ``workers`` jobs at once, first come first served; ``per_session`` jobs per
    session queued or running; at most ``max_waiting`` waiting in all."""

    def __init__(self, workers: int = 1, per_session: int = 1, max_waiting: int = 64) -> None:
        if workers < 1 or per_session < 1 or max_waiting < 1:
            raise ValueError("workers, per_session and max_waiting must be >= 1")
        self.workers, self.per_session, self.max_waiting = workers, per_session, max_waiting
        self._cond = threading.Condition()
        self._running: list[str] = []  # the session of each running job
        self._waiting: deque[tuple[str, object]] = deque()  # (session, ticket), oldest first

    def busy(self) -> tuple[int, int]:
        """(jobs running, jobs waiting)."""
        with self._cond:
            return len(self._running), len(self._waiting)

    def _ahead(self, entry: tuple[str, object]) -> int:
        """Jobs that go before ``entry``: the running ones, then those queued earlier."""
        return len(self._running) + self._waiting.index(entry)

    @contextlib.contextmanager
    def slot(self, session: str, timeout: float | None = None,
             on_wait: Callable[[int], None] | None = None) -> Iterator[None]:
        """Hold one of the ``workers`` slots for the ``with`` body, waiting in line for it.

        ``on_wait(n)`` is called (in this thread) whenever the number of jobs ahead changes
        while waiting. Raises :class:`BusyError` when the session already has
        ``per_session`` jobs, when ``max_waiting`` jobs wait, or after ``timeout`` seconds.
        """
        entry = (session, object())
        with self._cond:
            mine = self._running.count(session) + sum(s == session for s, _ in self._waiting)
            if mine >= self.per_session:
                raise BusyError(f"you already have {mine} slow computation(s) running or waiting; "
                                "this one can start when it is done")
            if len(self._waiting) >= self.max_waiting:
                raise BusyError(f"the server is busy ({len(self._waiting)} slow computations waiting); "
                                "try again in a minute")
            self._waiting.append(entry)
            deadline = None if timeout is None else time.monotonic() + timeout
            shown = -1
            try:
                while (ahead := self._ahead(entry)) >= self.workers:
                    if on_wait is not None and ahead != shown:
                        shown = ahead
                        self._cond.release()  # the callback may draw on a page: not under the lock
                        try:
                            on_wait(ahead - self.workers + 1)
                        finally:
                            self._cond.acquire()
                        continue
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise BusyError(f"waited {timeout:.0f} s for a turn; the server is busy, try again later")
                    self._cond.wait(left)
            except BaseException:
                self._waiting.remove(entry)
                self._cond.notify_all()
                raise
            self._waiting.remove(entry)
            self._running.append(session)
        try:
            yield
        finally:
            with self._cond:
                self._running.remove(session)
                self._cond.notify_all()
