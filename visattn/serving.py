"""Lab or public: what a dashboard server lets its users do.

The lab mode (the default) trusts whoever reaches the port: Train page, checkpoints by
server path, torchvision weight downloads, big checkpoint uploads. The public mode
(``VISATTN_PUBLIC=1 make run``, or ``streamlit run dashboard.py -- --public``) is for a
class or a demo: no training, no server paths, no downloads, checkpoint uploads up to
:data:`PUBLIC_CHECKPOINT_BYTES`, and the slow explanation methods queued
(:data:`SLOW_QUEUE`: one at a time, one per session).

>>> p = policy({"VISATTN_PUBLIC": "1"}, []); p.public, p.train, p.server_paths
(True, False, False)
>>> policy({}, ["dashboard.py"]).public
False
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

from visattn.checkpoint import MAX_CHECKPOINT_BYTES
from visattn.workqueue import WorkQueue

PUBLIC_CHECKPOINT_BYTES = 32 * 2**20  # the shipped checkpoints are <= 20 MB
SLOW_QUEUE = WorkQueue(workers=1, per_session=1)  # this process's slow jobs, in public mode
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Policy:
    """What this server allows (see the module docstring)."""

    public: bool

    @property
    def train(self) -> bool:
        """May users start training runs (the Train page)?"""
        return not self.public

    @property
    def server_paths(self) -> bool:
        """May users name a checkpoint file on the server?"""
        return not self.public

    @property
    def downloads(self) -> bool:
        """May users make the server download pretrained weights?"""
        return not self.public

    @property
    def checkpoint_upload_bytes(self) -> int:
        return PUBLIC_CHECKPOINT_BYTES if self.public else MAX_CHECKPOINT_BYTES

    @property
    def slow_queue(self) -> WorkQueue | None:
        """The queue slow methods wait in (None: they run at once)."""
        return SLOW_QUEUE if self.public else None

    def banner(self) -> str:
        """One line for the top of every page ('' in the lab mode)."""
        if not self.public:
            return ""
        return (f"Public server: training, checkpoints by server path and weight downloads are off; "
                f"checkpoint uploads up to {self.checkpoint_upload_bytes // 2**20} MB; the slow explanations "
                f"(integrated gradients, occlusion, ...) and the sanity check wait their turn "
                f"({SLOW_QUEUE.workers} at a time, {SLOW_QUEUE.per_session} per user).")


def policy(environ: Mapping[str, str] | None = None, argv: Sequence[str] | None = None) -> Policy:
    """The policy from ``VISATTN_PUBLIC`` (1/true/yes/on) or a ``--public`` script argument."""
    environ = os.environ if environ is None else environ
    argv = sys.argv if argv is None else argv
    public = environ.get("VISATTN_PUBLIC", "").strip().lower() in _TRUE or "--public" in argv[1:]
    return Policy(public=public)
