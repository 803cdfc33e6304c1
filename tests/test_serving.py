"""visattn.serving: the lab and public policies."""
from __future__ import annotations

import doctest

from visattn import serving
from visattn.checkpoint import MAX_CHECKPOINT_BYTES
from visattn.serving import PUBLIC_CHECKPOINT_BYTES, SLOW_QUEUE, policy


def test_switches() -> None:
    for value in ("1", "true", "YES", " on "):
        assert policy({"VISATTN_PUBLIC": value}, []).public
    for value in ("", "0", "false", "no"):
        assert not policy({"VISATTN_PUBLIC": value}, ["dashboard.py"]).public
    assert policy({}, ["dashboard.py", "--public"]).public
    assert not policy({}, ["--public"]).public  # argv[0] is the script, not a switch


def test_public_turns_off_what_reaches_the_server() -> None:
    lab, public = policy({}, []), policy({"VISATTN_PUBLIC": "1"}, [])
    assert (lab.train, lab.server_paths, lab.downloads, lab.slow_queue) == (True, True, True, None)
    assert (public.train, public.server_paths, public.downloads) == (False, False, False)
    assert public.slow_queue is SLOW_QUEUE and SLOW_QUEUE.per_session == 1
    assert lab.checkpoint_upload_bytes == MAX_CHECKPOINT_BYTES
    assert public.checkpoint_upload_bytes == PUBLIC_CHECKPOINT_BYTES < MAX_CHECKPOINT_BYTES
    assert lab.banner() == ""
    text = public.banner()
    assert "training" in text and "server path" in text and "32 MB" in text and "\n" not in text


def test_docstring() -> None:
    assert doctest.testmod(serving).failed == 0
