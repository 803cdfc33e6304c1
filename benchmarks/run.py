"""`make bench`: every benchmark, written to benchmarks/results.md and results.json.

Each figure is a ratio against a baseline measured in the same run, with absolute times.
    python -m benchmarks.run                      # everything
    python -m benchmarks.run --only capture train # some sections
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.table import fmt
from visattn import capture, create_model, paths
from visattn.zoo import load_model

ROOT = paths.root()
OUT = Path(__file__).resolve().parent
DATA = paths.data()


def timeit(fn: Callable[[], Any], repeat: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn`` over ``repeat`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def default_model() -> tuple[torch.nn.Module, dict]:
    if paths.default_checkpoint().exists():
        return load_model(str(paths.default_checkpoint()))
    return create_model("sa_cnn").eval(), {"mean": [0.5] * 3, "std": [0.25] * 3, "classes": [str(i) for i in range(10)]}


# ----------------------------------------------------------------------------- capture vs plain forward
def bench_capture() -> list[dict]:
    model, _ = default_model()
    rows = []
    for batch in (1, 64):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            plain = timeit(lambda: model(x), repeat=30 if batch == 1 else 10)
        cap = timeit(lambda: capture(model, x), repeat=30 if batch == 1 else 10)
        rows.append({"what": f"capture, batch {batch}", "baseline": "plain forward", "seconds": cap,
                     "baseline_seconds": plain, "ratio": cap / plain, "target": "≤ 1.5"})
    return rows


def bench_foreign_capture(repeat: int = 5) -> list[dict]:
    """Capture of a ViT-B/16-sized timm model (random weights, 224 px) through visattn.intercept
    against its plain fused forward; runs alternate, so both see the same machine load."""
    import timm

    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        with torch.no_grad():
            model(x)
        capture(model, x)
        plain, cap = [], []
        for _ in range(repeat):
            t = time.perf_counter()
            with torch.no_grad():
                model(x)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            capture(model, x)
            cap.append(time.perf_counter() - t)
        p, c = statistics.median(plain), statistics.median(cap)
        rows.append({"what": f"capture timm vit_base_patch16_224, 224 px, batch {batch}", "baseline": "plain forward",
                     "seconds": c, "baseline_seconds": p, "ratio": c / p, "target": "≤ 1.5"})
    return rows


# ----------------------------------------------------------------------------- training throughput
SEED_LOOP = r'''
import sys, time, torch, torchvision, torchvision.transforms as T
from visattn import create_model
torch.manual_seed(0)
tf = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
ds = torchvision.datasets.ImageFolder(sys.argv[1] + "/train", transform=tf)
ds = torch.utils.data.Subset(ds, torch.randperm(len(ds))[: int(sys.argv[2])].tolist())
loader = torch.utils.data.DataLoader(ds, batch_size=100, shuffle=True, num_workers=2)
model = create_model("sa_cnn").train()
opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
crit = torch.nn.CrossEntropyLoss()
t, n = time.perf_counter(), 0
for x, y in loader:
    opt.zero_grad(); loss = crit(model(x), y); loss.backward(); opt.step(); n += len(y)
print(n / (time.perf_counter() - t))
'''


def bench_train(n: int = 8192) -> list[dict]:
    """Our loop (cached uint8, batched augmentation, channels_last, batch 512) against the
    seed's (ImageFolder + transforms + DataLoader, batch 100), same model, same images."""
    import tempfile

    from visattn.train import TrainConfig, train

    seed = float(subprocess.run([sys.executable, "-c", SEED_LOOP, str(DATA), str(n)], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "b.safetensors"
        train(TrainConfig(data=str(DATA), out=str(out), epochs=1, subset=n, eval_subset=100, log_every=1))
        lines = [json.loads(l) for l in out.with_name("b.metrics.jsonl").read_text().splitlines()]
    ours = next(l for l in lines if l["type"] == "epoch")["img_per_s"]
    return [{"what": "training images/s (sa_cnn, CPU)", "baseline": "seed loop (DataLoader, batch 100)",
             "value": ours, "baseline_value": seed, "ratio": ours / seed, "target": "≥ 2"}, *bench_attention_kernels()]


def _form_run(folder: Path, name: str, extra: tuple[str, ...] = (), **form: Any) -> dict[str, Any]:
    """One Train-page run as the page starts it (a ``visattn train`` process; ``extra``: more
    command-line words): wall and CPU seconds from start to the finished checkpoint, its last
    test accuracy, and the probe's attention entropy (last attention layer) before training
    and at the end."""
    import resource

    from visattn.app import runs

    os.environ["VISATTN_RUNS"] = str(folder)  # the page's runs/ folder, here a temporary one
    argv = runs.train_argv(name, data=DATA, **form) + list(extra)
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(argv, cwd=ROOT, capture_output=True, check=True)
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    record = runs.read_run(folder / f"{name}.metrics.jsonl")
    _, entropy, uniform = list(record.entropy().values())[-1]
    return {"seconds": wall, "cpu_seconds": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
            "accuracy": record.epochs[-1]["test_acc"], "entropy_start": entropy[0], "entropy_end": entropy[-1],
            "uniform": uniform}


def bench_train_form() -> list[dict]:
    """The Train page's default form (what a teacher gets by pressing Start) against the same
    form with attention's shape learning at the plain learning rate (``--attn-lr-scale 1``:
    what the entropy fall comes from), both started as the page starts them: time to the
    finished checkpoint, test accuracy, probe entropy."""
    import tempfile

    from visattn.app import runs

    before = os.environ.get("VISATTN_RUNS")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            new = _form_run(Path(tmp), "form_default")
            old = _form_run(Path(tmp), "form_plain_lr", extra=("--attn-lr-scale", "1"))
    finally:
        os.environ.pop("VISATTN_RUNS", None)
        if before is not None:
            os.environ["VISATTN_RUNS"] = before
    ok = "✓" if new["seconds"] <= 120 and new["accuracy"] >= 0.70 else "✗"
    form = ", ".join(f"{k} {v}" for k, v in runs.DEFAULT_FORM.items())
    return [{"what": f"Train page, default form ({form}): start to finished checkpoint, test accuracy "
                     f"{new['accuracy']:.1%}, probe entropy {new['entropy_start']:.2f} → {new['entropy_end']:.2f} nats "
                     f"(uniform {new['uniform']:.2f}), {new['cpu_seconds']:.0f} s of CPU",
             "baseline": f"the same with attention's shape at the plain learning rate, test accuracy "
                         f"{old['accuracy']:.1%}, probe entropy "
                         f"{old['entropy_start']:.2f} → {old['entropy_end']:.2f}",
             "seconds": new["seconds"], "baseline_seconds": old["seconds"], "ratio": new["seconds"] / old["seconds"],
             "target": f"≤ 120 s and ≥ 70% {ok}", "form": new, "form_plain_lr": old}]


def bench_attention_kernels(batch: int = 512, tokens: int = 64, channels: int = 128, heads: int = 4) -> list[dict]:
    """Forward + backward of one attention in bf16 autocast, as sa_cnn trains: the fused
    SDPA kernel (and its math backend) against matmul-softmax-matmul (`capture.fused_is_faster`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(batch, heads, tokens, channels // heads, requires_grad=True) for _ in range(3))
    scale = (channels // heads) ** -0.5

    def fwd_bwd(attend: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = attend()
            out.float().sum().backward()
        return step

    def fused() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

    def math_backend() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return fused()

    explicit = timeit(fwd_bwd(lambda: ((q @ k.transpose(-2, -1)) * scale).softmax(-1) @ v), repeat=10)
    what = f"attention forward + backward, bf16 CPU, batch {batch}, {tokens} tokens, {heads} heads × {channels // heads}"
    rows = []
    for name, fn in (("fused SDPA", fused), ("SDPA math backend", math_backend)):
        t = timeit(fwd_bwd(fn), repeat=10)
        rows.append({"what": f"{what}: {name}", "baseline": "explicit matmul-softmax-matmul", "seconds": t,
                     "baseline_seconds": explicit, "ratio": t / explicit, "target": "(why training on CPU uses the explicit form)"})
    return rows


# ----------------------------------------------------------------------------- explanations
def bench_explain() -> list[dict]:
    from visattn import explain

    model, _ = default_model()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain = timeit(lambda: model(x), repeat=20)
    rows = []
    for name, method in explain.METHODS.items():  # each with its defaults (IG: 50 steps; occlusion at 32 px: 4×4, stride 2)
        s = timeit(lambda: method(model, x), repeat=5, warmup=1)
        rows.append({"what": f"explain: {name}", "baseline": "plain forward", "seconds": s,
                     "baseline_seconds": plain, "ratio": s / plain})
    return rows


def bench_attnlrp(repeat: int = 5) -> list[dict]:
    """AttnLRP (lxt's rules on a private copy) and transformer attribution on a ViT-B/16 (torchvision,
    random weights with a random head, 224 px, batch 1) against its plain forward; runs alternate,
    so all three see the same machine load. Target from issue #15: relevance < 5 forwards' worth."""
    import torchvision

    from visattn import attnlrp
    from visattn.relevance import transformer_attribution

    model = torchvision.models.vit_b_16(weights=None).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    x = torch.randn(1, 3, 224, 224)
    runs = {"plain": lambda: model(x), "view": lambda: attnlrp.lrp_view(model),
            "attnlrp": lambda: attnlrp.attnlrp(model, x), "transformer_attribution": lambda: transformer_attribution(model, x)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(repeat + 1):  # the first round warms up
        for name, fn in runs.items():
            t = time.perf_counter()
            with torch.no_grad() if name == "plain" else torch.enable_grad():
                fn()
            if i:
                times[name].append(time.perf_counter() - t)
    plain = statistics.median(times["plain"])
    conservation = float(attnlrp.attnlrp(model, x).conservation[0])
    notes = {"attnlrp": f"< 5; conservation on this random-weight model {conservation:.1%}",
             "view": "", "transformer_attribution": "< 5; its z⁺ rule costs a forward, a gradient and 3 matmuls "
                                                    "per linear layer (96% of ViT-B's work): at least 5"}
    labels = {"attnlrp": "AttnLRP (lxt)", "view": "AttnLRP's private copy alone", "transformer_attribution":
              "transformer attribution"}
    return [{"what": f"{labels[name]}, torchvision vit_b_16, 224 px, batch 1", "baseline": "plain forward",
             "seconds": statistics.median(times[name]), "baseline_seconds": plain,
             "ratio": statistics.median(times[name]) / plain, "target": notes[name]}
            for name in ("attnlrp", "view", "transformer_attribution")]


# ----------------------------------------------------------------------------- heads: ablation and relevance
def bench_heads() -> list[dict]:
    """Head importance (every head of the default model) and one head-toggle rerun, each
    against a plain forward."""
    from visattn.ablation import ablate, head_importance

    model, _ = default_model()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain = timeit(lambda: model(x), repeat=20)
    layer = next(iter(capture(model, x).attention))
    importance = timeit(lambda: head_importance(model, x), repeat=10, warmup=2)
    toggle = timeit(lambda: ablate(model, x, {layer: [0]}), repeat=20)
    return [{"what": "head importance, every head of the default model", "baseline": "plain forward",
             "seconds": importance, "baseline_seconds": plain, "ratio": importance / plain, "target": "< 300 ms"},
            {"what": "head toggle rerun (one head ablated)", "baseline": "plain forward", "seconds": toggle,
             "baseline_seconds": plain, "ratio": toggle / plain, "target": "< 100 ms"}]


def bench_relevance(rounds: int = 40) -> list[dict]:
    """The transformer relevance methods per image on the shipped hybrid_vit against its plain
    forward: one torch thread, the three run in turn each round (so all see the same machine
    load), the minimum over the rounds."""
    from visattn import relevance

    vit = create_model("hybrid_vit").eval()
    path = ROOT / "checkpoints" / "hybrid_vit.safetensors"
    if path.exists():
        vit, _ = load_model(str(path))
    x = torch.randn(1, 3, 32, 32)

    def plain() -> None:
        with torch.no_grad():
            vit(x)

    runs = {"plain": plain, **{name: (lambda f=getattr(relevance, name): f(vit, x))
                               for name in ("gae", "transformer_attribution")}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = _alternating(runs, rounds, min)
    finally:
        torch.set_num_threads(threads)
    return [{"what": f"relevance: {name} (hybrid_vit, one image, 1 thread, min of {rounds} alternating)",
             "baseline": "plain forward", "seconds": best[name], "baseline_seconds": best["plain"],
             "ratio": best[name] / best["plain"], "target": "< 5×"} for name in ("gae", "transformer_attribution")]


def _alternating(fns: dict[str, Callable[[], Any]], repeat: int,
                 stat: Callable[[list[float]], float] = statistics.median) -> dict[str, float]:
    """Median (or ``stat``) seconds of each function, called in turn ``repeat`` times after one
    warm-up each (so that all of them see the same machine load)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: stat(ts) for name, ts in times.items()}


def bench_break(repeat: int = 9) -> list[dict]:
    """The Learn page's "break it" forward (``visattn.broken``) against a plain capture, on the
    default model (each break) and on a ViT-B/16-sized timm model at 224 px (positions off by the
    per-thread TorchFunctionMode, against the alternative it replaces: a deep copy of the model
    with the table zeroed, per call)."""
    import copy

    import timm

    from visattn.breaking import broken

    model, _ = default_model()
    x = torch.randn(1, 3, 32, 32)
    layer = next(iter(capture(model, x).attention))
    m = _alternating({"capture": lambda: capture(model, x), "scale": lambda: broken(model, x, scale=5.0),
                      "positions": lambda: broken(model, x, positions=False),
                      "head": lambda: broken(model, x, heads={layer: [0]})}, repeat=3 * repeat)
    rows = [{"what": f"break it, default model: {what}", "baseline": "capture", "seconds": m[key],
             "baseline_seconds": m["capture"], "ratio": m[key] / m["capture"], "target": "< 100 ms"}
            for key, what in (("scale", "scores ×5"), ("positions", "positions off"), ("head", "one head removed"))]
    vit, x = timm.create_model("vit_base_patch16_224", pretrained=False).eval(), torch.randn(1, 3, 224, 224)

    def copied() -> None:
        c = copy.deepcopy(vit)
        with torch.no_grad():
            c.pos_embed.zero_()
        capture(c, x)

    m = _alternating({"capture": lambda: capture(vit, x), "positions": lambda: broken(vit, x, positions=False),
                      "copy": copied}, repeat=repeat)
    rows += [{"what": "break it, timm ViT-B/16 224 px: positions off", "baseline": "capture", "seconds": m["positions"],
              "baseline_seconds": m["capture"], "ratio": m["positions"] / m["capture"], "target": "≤ 1.5"},
             {"what": "... the same by a deep copy with pos_embed zeroed", "baseline": "capture", "seconds": m["copy"],
              "baseline_seconds": m["capture"], "ratio": m["copy"] / m["capture"], "target": "(not used)"}]
    return rows


# ----------------------------------------------------------------------------- the dashboard's server side
def bench_dashboard(uploads: int = 8, clicks: int = 30) -> list[dict]:
    """Server-side time of Explore reruns: the page itself, timed around
    ``pages._state.run`` under AppTest (what a Streamlit server runs per interaction):
    a new upload (bytes -> model -> every figure) and a query click (no model run)."""
    import random

    from PIL import Image
    from streamlit.testing.v1 import AppTest

    from pages import _state

    model, meta = default_model()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain = timeit(lambda: model(x), repeat=50)

    spent: list[float] = []
    real_run = _state.run

    def timed(page: Callable[[], None]) -> None:
        t = time.perf_counter()
        try:
            real_run(page)
        finally:
            spent.append(time.perf_counter() - t)

    def rerun(at) -> float:
        spent.clear()
        at.run()
        if at.exception or at.error:
            raise RuntimeError(f"Explore failed: {[e.value for e in at.exception]} {[e.value for e in at.error]}")
        return sum(spent)

    def jpeg(seed: int) -> bytes:
        g = torch.Generator().manual_seed(seed)
        buf = io.BytesIO()
        Image.fromarray((torch.rand(96, 128, 3, generator=g) * 255).byte().numpy()).save(buf, "JPEG")
        return buf.getvalue()

    _state.run = timed
    try:
        at = AppTest.from_file(str(ROOT / "dashboard.py"), default_timeout=300).run()  # opens on Explore
        at.radio(key="_w_image_source").set_value("Upload an image")
        at.run()
        up = []
        for i in range(uploads + 1):  # the first one also warms the caches up
            at.file_uploader(key="explore_upload").set_value((f"{i}.jpg", jpeg(i), "image/jpeg"))
            up.append(rerun(at))
        rng = random.Random(0)
        click = []
        for _ in range(clicks + 3):
            at.session_state["query_yx"] = (rng.random(), rng.random())
            click.append(rerun(at))
    finally:
        _state.run = real_run
    up_s, click_s = statistics.median(up[1:]), statistics.median(click[3:])
    return [
        {"what": "new upload, bytes to every figure (Explore script, server side)", "baseline": "plain forward",
         "seconds": up_s, "baseline_seconds": plain, "ratio": up_s / plain,
         "target": f"< 300 ms; median of {uploads}, max {max(up[1:]) * 1000:.0f} ms"},
        {"what": "query click: Explore rerun, no model run (server side)", "baseline": "plain forward",
         "seconds": click_s, "baseline_seconds": plain, "ratio": click_s / plain,
         "target": f"< 50 ms; median of {clicks}, p90 {sorted(click[3:])[int(0.9 * clicks)] * 1000:.0f} ms"},
    ]


# ----------------------------------------------------------------------------- scaling with tokens
SCALE_ONE = r'''
import json, sys, time, torch
from visattn import capture, create_model
from visattn.models.attention import SpatialSelfAttention2d
kind, size, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
if kind == "grid":
    model = SpatialSelfAttention2d(64, 4, (size, size)).eval(); x = torch.randn(1, 64, size, size)
else:
    model = create_model("vit_b_16", image_size=size).eval(); x = torch.randn(1, 3, size, size)

def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024

def first_call_peak(fn):
    # Linux: writing 5 to clear_refs resets VmHWM (peak resident) to the current resident size
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS:")
    out = fn()
    return out, status("VmHWM:") - base

if budget < 0:  # the plain forward, the baseline: its own process, same measurements
    with torch.no_grad():
        _, peak = first_call_peak(lambda: model(x))
        t = time.perf_counter(); model(x); dt = time.perf_counter() - t
    print(json.dumps({"seconds": dt, "peak_mb": peak}))
    sys.exit()
tr, peak = first_call_peak(lambda: capture(model, x, budget_bytes=budget))
del tr
t = time.perf_counter(); tr = capture(model, x, budget_bytes=budget); dt = time.perf_counter() - t
s = next(iter(tr.attention.values()))
t = time.perf_counter(); s.row(0, s.q.shape[2] // 2); row = time.perf_counter() - t
kept = sum(t.numel() * t.element_size() for a in tr.attention.values()
           for t in (a.q, a.k, a.v, a.weights, a.bias, a.context, a.inputs, a.outputs) if t is not None)
print(json.dumps({"seconds": dt, "row_seconds": row, "kept_mb": kept / 2**20, "tokens": s.q.shape[2],
                  "peak_mb": peak}))
'''


def bench_scaling() -> list[dict]:
    rows = []
    cases = [("grid", s) for s in (8, 16, 32, 64)] + [("vit_b_16", 224), ("vit_b_16", 384)]
    for kind, size in cases:
        res = {}
        for mode, budget in (("plain", -1), ("full", 2**40), ("on-demand", 0)):
            r = subprocess.run([sys.executable, "-c", SCALE_ONE, kind, str(size), str(budget)], cwd=ROOT,
                               capture_output=True, text=True, check=True)
            res[mode] = json.loads(r.stdout.split("\n")[-2])
        label = f"{size}×{size} grid (C=64, 4 heads)" if kind == "grid" else f"ViT-B/16 at {size} px"
        rows.append({"what": f"capture scaling: {label}, {res['full']['tokens']} tokens", "baseline": "full matrices",
                     "seconds": res["on-demand"]["seconds"], "baseline_seconds": res["full"]["seconds"],
                     "ratio": res["on-demand"]["seconds"] / res["full"]["seconds"],
                     "kept_mb": res["on-demand"]["kept_mb"], "baseline_kept_mb": res["full"]["kept_mb"],
                     "row_ms": res["on-demand"]["row_seconds"] * 1000, "tokens": res["full"]["tokens"],
                     "peak_mb": res["on-demand"]["peak_mb"], "baseline_peak_mb": res["full"]["peak_mb"],
                     "forward_peak_mb": res["plain"]["peak_mb"], "forward_seconds": res["plain"]["seconds"]})
    plot_scaling(rows)
    return rows


def plot_scaling(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [r for r in rows if "grid" in r["what"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    n = [r["tokens"] for r in grid]
    a1.loglog(n, [r["baseline_seconds"] for r in grid], "o-", label="full matrices")
    a1.loglog(n, [r["seconds"] for r in grid], "s-", label="on-demand rows")
    a1.set(xlabel="tokens", ylabel="capture seconds", title="capture time")
    a2.loglog(n, [r["baseline_kept_mb"] for r in grid], "o-", label="full matrices")
    a2.loglog(n, [r["kept_mb"] for r in grid], "s-", label="on-demand rows")
    a2.set(xlabel="tokens", ylabel="memory kept by the trace (MB)", title="capture memory")
    for a in (a1, a2):
        a.legend()
        a.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "scaling.png", dpi=100)


def bench_sessions_section() -> list[dict]:
    from benchmarks.sessions import bench_sessions

    return bench_sessions()


def bench_tabs_section() -> list[dict]:
    from benchmarks.tabs import bench_tabs

    return bench_tabs()


def bench_tabs_server_section() -> list[dict]:
    from benchmarks.tabs import bench_server_cpu

    return bench_server_cpu()


# ----------------------------------------------------------------------------- atlas and offline session
def bench_atlas(n: int = 1000) -> list[dict]:
    """Extraction of Q and K for the atlas (1,000 test images) against a plain forward pass of
    the same images; the cached atlas's lookup (what the Atlas page does per rerun, PCA atlas
    built first in a temporary folder) and the offline session export against one forward."""
    import tempfile

    from visattn import atlas, export
    from visattn.data import load_split
    from visattn.inference import model_inputs
    from visattn.app.views import sample_png

    model, meta = default_model()
    split = load_split(str(DATA), "test")
    x = model_inputs(split.images[split.sample_indices(n)], meta)
    with torch.no_grad():
        plain = timeit(lambda: model(x), repeat=3, warmup=1)
    extract = timeit(lambda: atlas.extract(model, x), repeat=3, warmup=1)
    one = x[:1]
    with torch.no_grad():
        single = timeit(lambda: model(one), repeat=20)
    rows = [{"what": f"atlas: Q/K extraction, {n} images", "baseline": "plain forward of the same images",
             "seconds": extract, "baseline_seconds": plain, "ratio": extract / plain, "target": "< 60 s"}]
    with tempfile.TemporaryDirectory() as tmp:
        atlas.build_atlas(model, meta, split, n=n, method="pca", cache=tmp)
        lookup = timeit(lambda: atlas.build_atlas(model, meta, split, n=n, method="pca", cache=tmp, cached_only=True),
                        repeat=5, warmup=1)
    rows.append({"what": f"atlas: cached atlas lookup and load ({n} images)", "baseline": "plain forward, 1 image",
                 "seconds": lookup, "baseline_seconds": single, "ratio": lookup / single, "target": "page < 2 s"})
    png = sample_png(split, 0)
    html = timeit(lambda: export.session_html(model, meta, png), repeat=1, warmup=0)
    rows.append({"what": "offline session export (all methods)", "baseline": "plain forward, 1 image",
                 "seconds": html, "baseline_seconds": single, "ratio": html / single,
                 "target": f"{len(export.session_html(model, meta, png, methods=())) / 2**20:.2f} MB without scores"})
    return rows



ATLAS_OPEN = """
import json, sys, time
t0 = time.perf_counter()
import importlib, torch, streamlit, pages, visattn.atlas, plotly.graph_objects, pandas
from streamlit.testing.v1 import AppTest
for p in pages.PAGES:  # what a running dashboard has imported, and Streamlit's start-up (component scan)
    importlib.import_module(p.main.__module__)
AppTest.from_string("import streamlit as st\\nst.write(1)").run()
imports = time.perf_counter() - t0
original = visattn.atlas.cache_path
visattn.atlas.cache_path = lambda key, cache=None: original(key, cache or sys.argv[1])
at = AppTest.from_string("from pages import main\\nmain('atlas')", default_timeout=120)
for k, v in {"atlas_n": int(sys.argv[2]), "atlas_method": "pca", "atlas_tokens": 4096}.items():
    at.session_state[k] = v
times = []
for _ in range(3):
    t = time.perf_counter()
    at.run()
    times.append(time.perf_counter() - t)
    assert not at.exception and any("images, PCA" in c.value for c in at.caption), [e.value for e in at.exception]
view, = [e for e in at.get("bidi_component") if e.proto.component_name == "visattn_atlas"]
print(json.dumps({"imports": imports, "first": times[0], "warm": min(times[1:]), "bytes": len(view.proto.json)}))
"""


def bench_atlas_open(n: int = 1000) -> list[dict]:
    """The Atlas page opened on a cached atlas of ``n`` test images (4,096 tokens, every
    head) in a fresh process: its first run (model, test set and atlas read, the view's
    data made) against a rerun of the same page; the imports a running server has done
    already are reported apart."""
    import tempfile

    from visattn import atlas
    from visattn.data import load_split

    model, meta = default_model()
    with tempfile.TemporaryDirectory() as tmp:
        atlas.build_atlas(model, meta, load_split(str(DATA), "test"), n=n, method="pca", cache=tmp)
        r = subprocess.run([sys.executable, "-c", ATLAS_OPEN, tmp, str(n)], cwd=ROOT, capture_output=True, text=True,
                           check=True)
    m = json.loads(r.stdout.strip().split("\n")[-1])
    return [{"what": f"atlas page: first open on a cached atlas ({n} images), fresh process",
             "baseline": "a rerun of the open page", "seconds": m["first"], "baseline_seconds": m["warm"],
             "ratio": m["first"] / m["warm"],
             "target": f"< 2 s (imports before it: {m['imports']:.1f} s; view data {m['bytes'] / 2**20:.2f} MB)"}]


SECTIONS = {"capture": bench_capture, "foreign_capture": bench_foreign_capture, "train": bench_train,
            "train_form": bench_train_form, "explain": bench_explain, "attnlrp": bench_attnlrp, "heads": bench_heads,
            "break": bench_break, "relevance": bench_relevance, "dashboard": bench_dashboard,
            "sessions": bench_sessions_section, "tabs": bench_tabs_section, "tabs_server": bench_tabs_server_section,
            "scaling": bench_scaling, "atlas": bench_atlas, "atlas_open": bench_atlas_open}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", nargs="*", choices=sorted(SECTIONS), default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    results: dict[str, tuple[list[dict], str, float]] = {}
    for name in args.only or SECTIONS:
        print(f"running {name} ...", flush=True)
        start, load = dt.datetime.now().isoformat(timespec="seconds"), os.getloadavg()[0]
        results[name] = SECTIONS[name](), start, load
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    cuda = "CUDA" if torch.cuda.is_available() else "no CUDA"
    old = json.loads((OUT / "results.json").read_text()) if (OUT / "results.json").exists() else {}
    sections = old.get("sections", {})
    for name, (rows, start, load) in results.items():
        sections[name] = {"date": start, "machine": f"{machine}, {cuda}", "load": load, "rows": rows}
    (OUT / "results.json").write_text(json.dumps({"sections": sections}, indent=2))
    (OUT / "results.md").write_text(results_md(sections))
    print((OUT / "results.md").read_text())


def results_md(sections: dict[str, dict]) -> str:
    """``results.md``: one table per section, headed by when, where and at what load it ran
    (sections are rerun one at a time with ``--only``, so their dates differ)."""
    lines = ["# Benchmark results", "",
             "Each section as last run by `python -m benchmarks.run [--only SECTION ...]`: its start, the machine, "
             "and the 1-minute load average when it started (2 cores: a load above 2 means a shared CPU).", ""]
    for name, s in sections.items():
        load = "" if s.get("load") is None else f", load {s['load']:.1f}"
        lines += [f"## {name}", "", f"{s['date']}, {s['machine']}{load}." + (f" {s['note']}" if s.get("note") else ""),
                  "", "| what | time | baseline | ratio | target / notes |", "|---|---|---|---|---|"]
        lines += [fmt(r) for r in s["rows"]] + [""]
    return "\n".join(lines) + "\n![scaling](scaling.png)\n"


if __name__ == "__main__":
    main()
