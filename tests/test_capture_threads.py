"""Streamlit shares one cached model between sessions: captures in parallel threads never mix."""
from __future__ import annotations

import threading

import torch

from tests.conftest import small_config
from visattn import capture, create_model


def test_two_threads_two_images_no_cross_talk() -> None:
    model = create_model("sa_cnn", **small_config("sa_cnn")[0]).eval()
    images = [torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32) * 3]
    expected = [capture(model, x) for x in images]
    barrier = threading.Barrier(2)
    errors: list[str] = []

    def worker(i: int) -> None:
        for _ in range(25):
            barrier.wait()  # both threads inside the model at once
            trace = capture(model, images[i])
            if not torch.equal(trace.logits, expected[i].logits):
                errors.append(f"thread {i}: logits differ")
            for name, site in trace.attention.items():
                if not torch.equal(site.weights, expected[i].attention[name].weights):
                    errors.append(f"thread {i}: {name} weights belong to another image")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert not torch.equal(expected[0].attention["stages.1.1"].weights, expected[1].attention["stages.1.1"].weights)


def test_plain_forward_in_another_thread_is_not_recorded() -> None:
    """A training or plain inference call running beside a capture stays on the fused path."""
    model = create_model("sa_cnn", **small_config("sa_cnn")[0]).eval()
    seen: list[int] = []
    done = threading.Event()

    def plain() -> None:
        from visattn.sites import current_recorder

        while not done.is_set():
            seen.append(current_recorder() is not None)
            with torch.no_grad():
                model(torch.randn(1, 3, 32, 32))

    t = threading.Thread(target=plain)
    t.start()
    for _ in range(10):
        trace = capture(model, torch.randn(1, 3, 32, 32))
        assert len(trace.attention) == 2
    done.set()
    t.join()
    assert not any(seen)
