"""Public mode (VISATTN_PUBLIC=1) of the dashboard under AppTest: no Train page (a direct
request to /train gets one line), no server-path model source, no weight download, smaller
checkpoint uploads, a banner, and the slow methods computed through the per-process queue.
The lab mode (the default) keeps all of them."""
from __future__ import annotations

import contextlib
import threading
import time

import pytest

import pages
from tests.bad_inputs import encode, noise_image
from tests.test_dashboard import app, errors, needs_checkpoint, problems
from visattn import explain, serving
from visattn.workqueue import WorkQueue

PATH_SOURCE = "Path on the server"


def visible_pages(public: bool) -> list[str]:
    """URL paths of the pages the navigation shows."""
    policy = serving.policy({"VISATTN_PUBLIC": "1" if public else ""}, [])
    return [spec.url_path for spec in pages.allowed_pages(policy)]


@needs_checkpoint
def test_public_mode_turns_off_training_and_server_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISATTN_PUBLIC", "1")
    at = app("explore").run()
    assert not at.exception, problems(at)
    assert any("Public server" in i.value and "training" in i.value for i in at.info)  # the banner
    assert visible_pages(public=True) == ["explore", "compare", "models", "learn", "atlas"]
    source = at.radio(key="model_source")
    assert PATH_SOURCE not in source.options and "Upload .safetensors" in source.options
    source.set_value("Upload .safetensors").run()
    assert any("up to 32 MB" in c.value for c in at.caption)
    source.set_value("torchvision ViT-B/16").run()
    assert at.radio(key="vit_weights").options == ["random (offline)"]  # no ImageNet download
    assert not at.exception, problems(at)

    direct = app("train").run()  # a bookmarked /train
    assert not direct.exception, problems(direct)
    assert [e.value for e in direct.error] == ["Training is off on this public server: ask for the lab server to "
                                               "train models."]
    assert not direct.button  # no form, no Start


@needs_checkpoint
def test_lab_mode_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VISATTN_PUBLIC", raising=False)
    at = app("explore").run()
    assert not any("Public server" in i.value for i in at.info)
    assert visible_pages(public=False) == ["explore", "compare", "train", "models", "learn", "atlas"]
    assert PATH_SOURCE in at.radio(key="model_source").options
    at.radio(key="model_source").set_value(PATH_SOURCE).run()
    assert at.text_input(key="checkpoint_path") is not None


@needs_checkpoint
def test_public_slow_methods_wait_their_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compare in public mode: integrated gradients and occlusion run inside a turn of the
    process's queue (and only they); while another session holds the one turn, they wait."""
    turns, seen = [], {}

    class Recording(WorkQueue):
        @contextlib.contextmanager
        def slot(self, session, timeout=None, on_wait=None):
            with super().slot(session, timeout, on_wait):
                turns.append(session)
                yield

    queue = Recording(workers=1, per_session=1)
    bound = 300  # s: every method and the faithfulness curves, slow on a shared CPU; the other user waits as long
    monkeypatch.setattr(serving, "SLOW_QUEUE", queue)
    monkeypatch.setenv("VISATTN_PUBLIC", "1")
    at = app("compare")
    at.session_state["image_source"] = "Upload an image"  # straight to the uploader: nothing computed yet
    at.run()
    assert not at.exception and turns == [], problems(at)
    holding = threading.Event()

    def other_user() -> None:  # holds the only turn until the Compare run waits behind it (or bound s)
        with queue.slot("someone else"):
            holding.set()
            deadline = time.monotonic() + bound
            while queue.busy() != (1, 1) and time.monotonic() < deadline:
                time.sleep(0.01)
            seen["busy"] = queue.busy()

    t = threading.Thread(target=other_user)
    t.start()
    assert holding.wait(10)
    photo = encode(noise_image(40, 40, seed=1616), "PNG")  # a fresh image: no cached maps
    try:
        at.file_uploader(key="compare_upload").set_value(("public_compare.png", photo, "image/png"))
        at.run(timeout=bound)
    finally:
        t.join(bound + 10)
        print(turns, seen, queue.busy())
    assert not at.exception and not errors(at), (problems(at), errors(at))
    assert seen["busy"] == (1, 1)  # the Compare run waited in line behind the other user
    sessions = [s for s in turns if s != "someone else"]
    slow = [name for name, m in explain.METHODS.items() if m.slow]  # integrated gradients, occlusion, ...
    assert {"integrated_gradients", "occlusion"} <= set(slow)
    assert len(sessions) == len(slow) and len(set(sessions)) == 1  # one turn per slow method, one session
    assert queue.busy() == (0, 0)
