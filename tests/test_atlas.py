"""The query-key atlas: AttentionViz normalisation, the correlation check, extraction
(one process and two torchrun processes), the cache."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from tests.conftest import ROOT, TORCHRUN
from visattn import atlas, create_model
from visattn.data import Split
from visattn.errors import VisattnError
from visattn.tracing import capture


def tiny_model() -> torch.nn.Module:
    """sa_cnn with attention at two stages (16×16 and 8×8 grids), 2 heads."""
    return create_model("sa_cnn", widths=(8, 16, 16), heads=2, attn_stages=(0, 1)).eval()


def test_translation_and_scaling_keep_every_softmax_row() -> None:
    g = torch.Generator().manual_seed(1)
    b, n, d = 3, 10, 8
    q = torch.randn(b, n, d, generator=g) * 2 + 1.5
    k = torch.randn(b, n, d, generator=g) * 0.5 - 3  # far from the queries, smaller norms
    qn, kn = atlas.normalise_qk(q.reshape(-1, d), k.reshape(-1, d))
    qn, kn = qn.reshape(b, n, d), kn.reshape(b, n, d)
    before = (q @ k.transpose(1, 2) / d**0.5).softmax(-1)
    after = (qn @ kn.transpose(1, 2) / d**0.5).softmax(-1)
    assert torch.allclose(before, after, atol=1e-5)
    assert not torch.allclose(q @ k.transpose(1, 2), qn @ kn.transpose(1, 2), atol=1e-2)  # the keys did move
    assert torch.allclose(qn.reshape(-1, d).mean(0), kn.reshape(-1, d).mean(0), atol=1e-5)  # one centroid
    ratio = qn.norm(dim=-1).mean() / kn.norm(dim=-1).mean()
    assert 0.5 < ratio < 2.0  # comparable norms (before: about 5 / 6.1 apart)


def test_cosine_heads_are_normalised_first() -> None:
    q, k = torch.randn(20, 4) * 7, torch.randn(20, 4) * 0.1
    qn, kn = atlas.normalise_qk(q, k, "cosine")
    unit = torch.nn.functional.normalize
    assert torch.allclose((qn @ kn.T).softmax(-1), (unit(q, dim=-1) @ unit(k, dim=-1).T).softmax(-1), atol=1e-5)


def _by_hand(q, k, eq, ek, i, j) -> tuple[np.ndarray, np.ndarray]:
    q, k, eq, ek = (np.asarray(v, np.float64) for v in (q, k, eq, ek))
    return (q[i] * k[j]).sum(1), np.sqrt(((eq[i] - ek[j]) ** 2).sum(1))


def test_correlation_planted_keys_equal_queries_orders_pairs_perfectly() -> None:
    """Unit queries, keys equal to them, points = the vectors: |q - k|² = 2 - 2 q·k, so
    ordering the pairs by q·k and by nearness is one ordering."""
    u = torch.nn.functional.normalize(torch.randn(40, 2, generator=torch.Generator().manual_seed(0)).double(), dim=-1)
    i, j = atlas.sample_pairs(40, 40)
    assert len(i) == 40 * 40  # fewer pairs than the sample size: all of them
    dots, dist = _by_hand(u, u, u, u, i, j)
    assert np.allclose(dots, 1 - dist**2 / 2, atol=1e-9)  # nearness decides the dot product
    order = np.lexsort((j, i, dots))
    assert np.all(np.diff(-dist[order]) >= -1e-9)  # sorted by q·k, the pairs come out sorted by nearness
    r = atlas.qk_correlation(u, u, u.numpy(), u.numpy())
    assert r == pytest.approx(pearsonr(dots, -dist).statistic, abs=1e-9) and r > 0.95
    shuffled = u.numpy()[np.random.default_rng(0).permutation(40)]  # points no longer belong to their keys
    assert abs(atlas.qk_correlation(u, u, u.numpy(), shuffled)) < 0.2


def test_correlation_on_sampled_pairs_matches_scipy() -> None:
    rng = np.random.default_rng(3)
    q, k = rng.normal(size=(300, 5)), rng.normal(size=(200, 5))
    eq, ek = -0.3 * (q @ rng.normal(size=(5, 2))) + rng.normal(size=(300, 2)), rng.normal(size=(200, 2))
    i, j = atlas.sample_pairs(300, 200, pairs=5000, seed=7)
    assert len(i) == 5000 and i.max() < 300 and j.max() < 200
    dots, dist = _by_hand(q, k, eq, ek, i, j)
    r = atlas.qk_correlation(q, k, eq, ek, pairs=5000, seed=7)
    assert r == pytest.approx(pearsonr(dots, -dist).statistic, abs=1e-12)


def test_extract_gives_the_captured_q_and_k_of_each_sampled_token(one_thread) -> None:
    model = tiny_model()
    x = torch.randn(7, 3, 32, 32)
    layers = atlas.extract(model, x, max_tokens=50, seed=3, batch_size=3)  # batches of 3, 3, 1
    trace = capture(model, x)
    assert set(layers) == set(trace.attention)
    for name, t in layers.items():
        site = trace.attention[name]
        assert len(t.token) == 50 and t.grid == site.grid and t.heads == 2
        flat = t.image * site.q.shape[2] + t.token
        assert torch.equal(flat, atlas.sample_tokens(7, site.q.shape[2], 50, 3 + list(layers).index(name)))
        assert torch.allclose(t.q, site.q[t.image, :, t.token], atol=1e-5)
        assert torch.allclose(t.k, site.k[t.image, :, t.token], atol=1e-5)


def test_model_without_attention_is_refused() -> None:
    model = create_model("cbam_cnn", stem_width=8, widths=(8, 16, 16)).eval()
    with pytest.raises(VisattnError, match="no self-attention"):
        atlas.extract(model, torch.randn(2, 3, 32, 32))


SHARD_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from visattn import atlas, create_model
from visattn.train import dist_info
torch.manual_seed(0)
model = create_model("sa_cnn", widths=(8, 16, 16), heads=2, attn_stages=(0, 1)).eval()
x = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(5))
rank, world = dist_info()
layers = atlas.extract(model, x, max_tokens=200, seed=1, batch_size=2, rank=rank, world=world)
if rank == 0:
    save_file({f"{n}/{k}": getattr(t, k).contiguous() for n, t in layers.items() for k in ("q", "k", "image", "token")},
              sys.argv[1])
"""


def test_two_torchrun_processes_extract_what_one_does(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    outs = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}.safetensors"
        cmd = [*TORCHRUN, "--nproc_per_node", str(procs), str(script), str(out)]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs[procs] = load_file(out)
    assert outs[1].keys() == outs[2].keys() and len(outs[1]) == 8  # 2 layers × q, k, image, token
    for key in outs[1]:
        assert torch.equal(outs[1][key], outs[2][key]), key


def small_split(n: int = 12) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 3,
                 ("a", "b", "c"), "planted")


META = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "classes": ["a", "b", "c"], "model": "sa_cnn"}


def test_build_atlas_is_cached_by_model_data_and_parameters(tmp_path: Path, one_thread) -> None:
    model, split = tiny_model(), small_split()
    a = atlas.build_atlas(model, META, split, n=8, max_tokens=64, method="pca", cache=tmp_path)
    files = list((tmp_path / "atlas").glob("*.safetensors"))
    assert len(files) == 1
    assert [(h.layer, h.head) for h in a.heads] == [(n, h) for n in a.layers for h in range(2)]
    for hm in a.heads:
        lay = a.layers[hm.layer]
        assert hm.xy.shape == (2 * len(lay["token"]), 2) and len(lay["token"]) == 64
        assert -1.0 <= hm.corr <= 1.0
    assert a.info["sampled"] == {n: 64 for n in a.layers} and set(a.indices) <= set(range(12))
    b = atlas.build_atlas(model, META, split, n=8, max_tokens=64, method="pca", cache=tmp_path)  # from the cache
    assert b.info.pop("from_cache") == str(files[0]) and b.info == a.info and all(np.array_equal(x.xy, y.xy) for x, y in zip(a.heads, b.heads))
    assert np.array_equal(b.images, split.images[torch.as_tensor(b.indices)].numpy())
    atlas.build_atlas(model, META, split, n=8, max_tokens=32, method="pca", cache=tmp_path)  # other parameters
    with torch.no_grad():
        model.head.fc.weight.mul_(2)  # other weights
    atlas.build_atlas(model, META, split, n=8, max_tokens=64, method="pca", cache=tmp_path)
    assert len(list((tmp_path / "atlas").glob("*.safetensors"))) == 3


def test_build_atlas_checks_its_arguments(tmp_path: Path) -> None:
    model, split = tiny_model(), small_split()
    with pytest.raises(VisattnError, match="unknown embedding"):
        atlas.build_atlas(model, META, split, n=4, method="mds", cache=tmp_path)
    with pytest.raises(VisattnError, match="no attention layer 'nope'; this model's: stages.0.1, stages.1.1"):
        atlas.build_atlas(model, META, split, n=4, max_tokens=16, method="pca", layer="nope", cache=tmp_path)
    with pytest.raises(VisattnError, match="heads 0..1, not 2"):
        atlas.build_atlas(model, META, split, n=4, max_tokens=16, method="pca", layer="stages.1.1", head=2,
                          cache=tmp_path)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_uploaded_images_make_a_data_set_labelled_by_the_model(tmp_path: Path, one_thread) -> None:
    from PIL import Image

    from visattn.atlas import UPLOADED
    from visattn.atlas_view import image_word
    from visattn.inference import model_inputs

    model = tiny_model()
    rng = np.random.default_rng(0)
    files = []
    for i, size in enumerate([(40, 30), (32, 32), (64, 48)]):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(buf, "PNG")
        files.append((f"p{i}.png", buf.getvalue()))
    split = atlas.split_of_images(files, model, META)
    assert split.images.shape == (3, 3, 32, 32) and split.source == UPLOADED
    with torch.no_grad():
        assert split.labels.tolist() == model(model_inputs(split.images, META)).argmax(-1).tolist()
    a = atlas.build_atlas(model, META, split, n=len(split), max_tokens=64, method="pca", cache=tmp_path)
    assert image_word(a) == "uploaded image" and a.indices.tolist() == [0, 1, 2]
    with pytest.raises(VisattnError, match=r"^bad.png: ") as e:
        atlas.split_of_images([*files, ("bad.png", b"not an image")], model, META)
    assert "\n" not in str(e.value)
    with pytest.raises(VisattnError, match="no images"):
        atlas.split_of_images([], model, META)


@pytest.mark.slow  # UMAP compiles with numba on its first call: minutes on a shared 2-core machine
def test_umap_keeps_planted_clusters_of_queries_and_keys_apart() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(2, 8, generator=g) * 4
    q = centres[torch.arange(400) % 2] + torch.randn(400, 8, generator=g) * 0.3
    k = q + torch.randn(400, 8, generator=g) * 0.1  # each key beside its query
    qn, kn = atlas.normalise_qk(q, k)
    xy = atlas.embed(torch.cat([qn, kn]).numpy(), "umap")
    assert atlas.qk_correlation(qn, kn, xy[:400], xy[400:]) > 0.8


# ----------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint of a tiny two-layer sa_cnn, ImageFolder data set of 12 images in 3 classes)."""
    from PIL import Image

    from visattn.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("atlas_cli")
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / "data" / "test" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "data" / "test" / c / f"{i}.png")
    torch.manual_seed(0)
    ckpt = root / "tiny.safetensors"
    save_checkpoint(ckpt, tiny_model(), classes=["a", "b", "c"], mean=[0.5] * 3, std=[0.25] * 3, accuracy=0.3, epochs=0)
    return ckpt, root / "data"


def test_cli_json_png_and_html(tiny_files, tmp_path: Path, capsys, one_thread) -> None:
    from PIL import Image

    from visattn.cli import main

    ckpt, data = tiny_files
    base = ["atlas", str(ckpt), "--data", str(data), "--n", "10", "--max-tokens", "60", "--method", "pca",
            "--cache", str(tmp_path / "cache")]
    assert main([*base, "--json", "--out", str(tmp_path / "atlas.png"), "--colour", "class"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["layer"], r["head"]) for r in report["heads"]] == [("stages.0.1", 0), ("stages.0.1", 1),
                                                                 ("stages.1.1", 0), ("stages.1.1", 1)]
    assert all(-1 <= r["corr"] <= 1 and r["points"] == 120 for r in report["heads"])
    assert report["info"]["sampled"] == {"stages.0.1": 60, "stages.1.1": 60}
    assert report["info"]["all_tokens"] == {"stages.0.1": 10 * 256, "stages.1.1": 10 * 64}
    assert "60 of 2,560 tokens (random sample)" in report["description"]
    assert Image.open(tmp_path / "atlas.png").size[0] > 500
    # the same atlas again, from the cache, one head, as a self-contained page
    assert main([*base, "--layer", "stages.1.1", "--head", "1", "--out", str(tmp_path / "atlas.html")]) == 0
    out = capsys.readouterr().out
    assert "stages.1.1 head 1: corr" in out and "stages.0.1" not in out.split("\n", 1)[1]
    html = (tmp_path / "atlas.html").read_text()
    assert "drawAtlas(" in html and "default-src 'none'" in html and "http://" not in html and "https://" not in html
    data = json.loads(html.split('id="visattn-atlas">')[1].split("</script>")[0])
    built, = [atlas.load_atlas(p) for p in (tmp_path / "cache" / "atlas").glob("*.safetensors")
              if atlas.load_atlas(p).info["head"] == 1]
    assert [(h["layer"], h["head"]) for h in data["heads"]] == [("stages.1.1", 1)]
    xy = np.frombuffer(base64.b64decode(data["heads"][0]["xy"]), "<f4").reshape(-1, 2)
    assert np.array_equal(xy, built.head("stages.1.1", 1).xy)


def test_cli_bad_layer_one_line_no_file(tiny_files, tmp_path: Path) -> None:
    ckpt, data = tiny_files
    out = tmp_path / "atlas.png"
    r = subprocess.run([sys.executable, "-m", "visattn", "atlas", str(ckpt), "--data", str(data), "--n", "4",
                        "--method", "pca", "--layer", "stages.9", "--out", str(out), "--cache", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (r.returncode, r.stderr.strip()) == (2, "error: no attention layer 'stages.9'; this model's: stages.0.1, "
                                                   "stages.1.1")  # on failure: the status and all of stderr
    assert not out.exists()


def test_cli_under_torchrun_writes_the_single_process_atlas(tiny_files, tmp_path: Path, one_thread) -> None:
    ckpt, data = tiny_files
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["atlas", str(ckpt), "--data", str(data), "--images", "12", "--max-tokens", "100", "--method", "pca",
            "--json"]
    single = subprocess.run([sys.executable, "-m", "visattn", *args, "--cache", str(tmp_path / "one")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    two = subprocess.run([*TORCHRUN, "--nproc_per_node", "2", "-m", "visattn", *args, "--cache", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = json.loads(single.stdout), json.loads(two.stdout)
    assert b["info"]["processes"] == 2 and a["info"]["processes"] == 1
    assert a["heads"] == b["heads"]
    one, = (tmp_path / "one" / "atlas").glob("*.safetensors")
    shared, = (tmp_path / "two" / "atlas").glob("*.safetensors")
    x, y = atlas.load_atlas(one), atlas.load_atlas(shared)
    assert one.name == shared.name and all(np.array_equal(h.xy, g.xy) for h, g in zip(x.heads, y.heads))
