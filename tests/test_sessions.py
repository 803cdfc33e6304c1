"""Many users: 20 concurrent Explore sessions on one process, each uploading its own image.

Streamlit runs every session's script in its own thread of one process and shares the
``st.cache_resource`` model between them; ``visattn.capture`` keeps its state in a
ContextVar. Here 20 AppTests of dashboard.py run in 20 threads, started together by a
barrier (page load, then upload), each with its own real CIFAR-10 test JPEG (two per
class) and its own query point. Every session must show, for ITS image and query:

* the prediction line and the top-5 chart (classes and percentages) computed in this
  process beforehand with ``visattn.checkpoint.load_checkpoint`` + ``visattn.inference.analyse``;
* the four similarity heatmaps (layer weights, q·k, cosine, softmax; mean of heads) of
  the layer it shows, at its query, equal to ``visattn.maps.query_maps`` of its image;
* its own upload and query in its session state;

and no exception or error element. The 20 images' expected values differ pairwise by
far more than the tolerance, so a session showing another's prediction or maps fails.
The driver (and the reason AppTest needs :func:`benchmarks.sessions.concurrent_apptest`
to run concurrently) is in benchmarks/sessions.py. Latencies are printed (``-s``), not
asserted.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from benchmarks.sessions import (
    DATA, DEFAULT_CKPT, SessionResult, cifar_images, concurrent_apptest, describe, frozen_checkpoint, query_for,
    run_session, run_sessions,
)

N = 20
SIMILARITY = ("attention", "dot", "cosine", "softmax")
PREDICTED = re.compile(r"^Predicted \*\*(.+?)\*\* \((\d+(?:\.\d+)?)%\)(?: · `[^`]+`)?$")
RTOL, ATOL = 1e-4, 1e-5  # same weights, same CPU: the maps agree far closer than images differ

pytestmark = [
    pytest.mark.skipif(not DEFAULT_CKPT.is_file(), reason="checkpoints/sa_cnn.safetensors is absent "
                       "(it appears after the first epoch of `make train-default`)"),
    pytest.mark.skipif(not (DATA / "test").is_dir(), reason=f"CIFAR-10 test JPEGs not found at {DATA / 'test'}"),
]


def expected_for(model, meta, data: bytes, yx: tuple[float, float]) -> dict:
    """What a session that uploaded ``data`` and set query ``yx`` must show."""
    from visattn.inference import analyse
    from visattn.maps import grid_index, query_maps

    a = analyse(model, meta, data)
    top = a.top(5)
    maps = {}
    for layer, site in a.trace.attention.items():
        q = query_maps(site, 0, grid_index(site, float(yx[0]), float(yx[1])))
        maps[layer] = {name: np.asarray(q[name], dtype=np.float32).mean(0) for name in SIMILARITY}
    return {"top": top, "classes": [c for c, _ in top], "percent": np.array([p * 100 for _, p in top]),
            "maps": maps}


def map_distance(shown: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """Largest difference, relative to the map's scale, over the four maps."""
    if set(shown) != set(want):
        return float("inf")
    worst = 0.0
    for name, w in want.items():
        s = np.asarray(shown[name], dtype=np.float64)
        if s.shape != w.shape:
            return float("inf")
        worst = max(worst, float(np.max(np.abs(s - w)) / (np.max(np.abs(w)) + 1e-12)))
    return worst


def check_session(r: SessionResult, want: dict, everyone: list[dict], images: list[tuple[str, bytes]]) -> list[str]:
    """Every way session ``r`` differs from what its own image and query must give."""
    where = f"session {r.index} ({r.name})"
    if r.failure:
        return [f"{where}: {r.failure}"]
    bad = [f"{where}: exception element: {e}" for e in r.exceptions] + [f"{where}: error element: {e}" for e in r.errors]
    m = PREDICTED.match(r.prediction or "")
    cls, p = want["top"][0]
    if m is None:
        bad.append(f"{where}: no prediction line ({r.prediction!r})")
    elif m.group(1) != cls or abs(float(m.group(2)) - 100 * p) > 0.051:
        bad.append(f"{where}: shows {r.prediction!r}, its image gives {cls} ({p:.1%})")
    if r.topk_classes != want["classes"] or r.topk_percent is None or \
            not np.allclose(r.topk_percent, want["percent"], rtol=0, atol=1e-3):
        bad.append(f"{where}: top-k {r.topk_classes} {r.topk_percent}, expected {want['classes']} {want['percent']}")
    if r.head != "mean of heads" or r.layer not in want["maps"]:
        bad.append(f"{where}: unexpected layer/head in session state: {r.layer!r}, {r.head!r}")
    else:
        own = want["maps"][r.layer]
        for name in SIMILARITY:
            shown = r.heatmaps.get(name)
            if shown is None or shown.shape != own[name].shape or \
                    not np.allclose(shown, own[name], rtol=RTOL, atol=ATOL * max(1.0, float(np.abs(own[name]).max()))):
                dists = [map_distance(r.heatmaps, e["maps"][r.layer]) for e in everyone]
                nearest = int(np.argmin(dists))
                bad.append(f"{where}: {name} map is not its own (relative difference {dists[r.index]:.2e}); "
                           f"nearest expected: session {nearest} ({images[nearest][0]})")
                break
    upload_name = r.name.replace("/", "_")
    if r.state_upload != (upload_name, r.sha):
        bad.append(f"{where}: session state uploaded_image is {r.state_upload}, expected ({upload_name}, {r.sha[:12]}…)")
    if r.state_query_yx != tuple(r.query_yx):
        bad.append(f"{where}: session state query_yx is {r.state_query_yx}, expected {r.query_yx}")
    if r.images < 2:
        bad.append(f"{where}: {r.images} images (overlay grid and averaged maps expected)")
    return bad


def test_twenty_concurrent_sessions_each_see_their_own_image(tmp_path):
    from visattn.checkpoint import load_checkpoint

    images = cifar_images(per_class=2, start=1)
    if len(images) < N:
        pytest.skip(f"need {N} CIFAR-10 test JPEGs (2 per class) under {DATA / 'test'}, found {len(images)}")
    images = images[:N]
    spare = cifar_images(per_class=1, start=3)[0]  # the warm-up session's image, not among the 20
    assert len({name.split("/")[0] for name, _ in images}) == 10
    queries = [query_for(i, N) for i in range(N)]
    ckpt = frozen_checkpoint(tmp_path)  # training rewrites the default checkpoint every epoch

    # Expected values, in this process, before any session runs.
    model, meta = load_checkpoint(str(ckpt))
    want = [expected_for(model, meta, data, yx) for (_, data), yx in zip(images, queries)]
    layers = list(want[0]["maps"])
    assert layers, "the default checkpoint has attention layers"
    for i in range(N):  # a session showing another's values would be caught
        for j in range(i + 1, N):
            assert np.abs(want[i]["percent"] - want[j]["percent"]).max() > 0.01 or want[i]["classes"] != want[j]["classes"]
            for layer in layers:
                assert map_distance(want[i]["maps"][layer], want[j]["maps"][layer]) > 1e-3, (i, j, layer)

    with concurrent_apptest():
        warm = run_session(-1, *spare, (0.5, 0.5), ckpt)  # loads the shared model, imports, first calls
        results = run_sessions(images, ckpt, queries=queries)

    assert warm.ok and warm.prediction, (warm.failure, warm.exceptions, warm.errors)
    assert [r.index for r in results] == list(range(N))
    problems = [p for r in results for p in check_session(r, want[r.index], want, images)]
    if not problems:  # the checks tell sessions apart: each fails against its neighbour's image
        for r in results:
            other = (r.index + 1) % N
            assert check_session(r, want[other], want, images), (r.index, other)
    print(f"\nwarm-up session alone: open {warm.open_s:.2f} s, upload {warm.upload_s:.2f} s "
          f"(first run in this process: includes one-time costs)")
    if all(r.failure is None for r in results):
        print(describe(results))
    for r in results:
        print(f"  session {r.index:2d} {r.name:22s} open {r.open_s:6.2f} s  upload {r.upload_s:6.2f} s  "
              f"{r.prediction}")
    assert not problems, "\n".join(problems)
