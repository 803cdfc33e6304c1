"""visattn.load_model: every SOURCE, saved as its users save it, reopened exactly; the hub
from a local cache while offline; pickles, misfits and hostile configs refused in one line."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.foreign_models import SIDE, TIMM_BASE, TINY_TIMM, tiny_hf, tiny_timm
from visattn import capture
from visattn.errors import CheckpointError
from visattn.sources import load_model

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(atol=1e-5, rtol=1e-5)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """Lay ``folder``'s files out as huggingface_hub's cache does (refs/main -> a snapshot)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root


def same_attention(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    """Both models' captures agree site by site (names aside: the HF wrapper adds "model.")."""
    ta, tb = capture(a, x), capture(b, x)
    torch.testing.assert_close(ta.logits, tb.logits, **TOL)
    assert len(ta.attention) == len(tb.attention) > 0
    for sa, sb in zip(ta.attention.values(), tb.attention.values()):
        torch.testing.assert_close(sa.weights, sb.weights, **TOL)
        assert (sa.prefix, sa.grid) == (sb.prefix, sb.grid)


@pytest.mark.parametrize("family", list(TINY_TIMM))
def test_timm_weights_reopen_exactly(family: str, tmp_path: Path) -> None:
    original = tiny_timm(family)
    save_file(original.state_dict(), tmp_path / "w.safetensors")  # what a timm user saves
    arch, overrides = TINY_TIMM[family]
    model, meta = load_model(f"timm:{arch}", weights=tmp_path / "w.safetensors", options={**TIMM_BASE, **overrides})
    x = torch.randn(2, 3, SIDE, SIDE)
    same_attention(model, original, x)
    import timm.data

    cfg = timm.data.resolve_model_data_config(original)  # timm's own preprocessing for the architecture
    assert (meta["image_size"], meta["resize"], meta["interpolation"]) == (SIDE, int(SIDE / cfg["crop_pct"]), "bicubic")
    assert (meta["mean"], meta["std"]) == (list(cfg["mean"]), list(cfg["std"]))
    assert meta["classes"] == ["0", "1", "2", "3", "4"] and meta["library"] == "timm"


@pytest.mark.parametrize("family", ["vit", "deit", "dinov2_registers"])
def test_hugging_face_folder_reopens_exactly(family: str, tmp_path: Path) -> None:
    original = tiny_hf(family)
    original.save_pretrained(tmp_path)
    model, meta = load_model(tmp_path)
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(pixel_values=x).logits, **TOL)
    same_attention(model, original, x)
    assert meta["classes"] == [f"class {i}" for i in range(5)]
    assert meta["image_size"] == SIDE and meta["mean"] == [0.5] * 3


def test_hugging_face_preprocessing_comes_from_the_image_processor(tmp_path: Path) -> None:
    from transformers import DeiTImageProcessor

    tiny_hf("deit").save_pretrained(tmp_path)
    DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": SIDE, "width": SIDE},
                       image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(tmp_path)
    _, meta = load_model(tmp_path)
    assert (meta["image_size"], meta["resize"], meta["interpolation"]) == (SIDE, [40, 40], "bicubic")
    assert meta["mean"] == pytest.approx([0.1, 0.2, 0.3]) and meta["std"] == pytest.approx([0.4, 0.5, 0.6])


def test_hub_id_opens_from_the_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    original = tiny_hf("dinov2_registers")
    original.save_pretrained(tmp_path / "saved")
    cache = hub_cache(tmp_path / "cache", "someone/tiny-dinov2-reg", tmp_path / "saved")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, meta = load_model("hf:someone/tiny-dinov2-reg")
    x = torch.randn(1, 3, SIDE, SIDE)
    same_attention(model, original, x)
    assert meta["source"] == "hf:someone/tiny-dinov2-reg"
    with pytest.raises(CheckpointError, match=r"^hf:someone/absent: not in the Hugging Face cache .* HF_HUB_OFFLINE"):
        load_model("hf:someone/absent")


def test_torchvision_weights_reopen_exactly(tmp_path: Path) -> None:
    import torchvision

    original = torchvision.models.get_model("vit_b_32", weights=None, image_size=SIDE, num_classes=5).eval()
    original.encoder.layers = original.encoder.layers[:2]  # keeps the saved file small
    model, _ = load_model("torchvision:vit_b_32", options={"image_size": SIDE, "num_classes": 5})
    model.encoder.layers = model.encoder.layers[:2]
    save_file(original.state_dict(), tmp_path / "w.safetensors")
    from visattn.sources import load_state_dict

    load_state_dict(model, tmp_path / "w.safetensors")
    same_attention(model.eval(), original, torch.randn(1, 3, SIDE, SIDE))


def test_labels_file_names_the_classes(tmp_path: Path) -> None:
    tiny_hf("vit").save_pretrained(tmp_path / "m")
    (tmp_path / "labels.txt").write_text("cat\ndog\nfox\nowl\nbee\n")
    (tmp_path / "labels.json").write_text(json.dumps({str(i): n for i, n in enumerate("abcde")}))
    assert load_model(tmp_path / "m", labels=tmp_path / "labels.txt")[1]["classes"] == ["cat", "dog", "fox", "owl", "bee"]
    assert load_model(tmp_path / "m", labels=tmp_path / "labels.json")[1]["classes"] == list("abcde")
    (tmp_path / "short.txt").write_text("cat\ndog\n")
    with pytest.raises(CheckpointError, match="short.txt has 2 labels; the model has 5 classes"):
        load_model(tmp_path / "m", labels=tmp_path / "short.txt")


class Boom:
    """Unpickling this writes a file: proof that a pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("ran",))


def test_pickles_are_refused_without_running(tmp_path: Path) -> None:
    proof = tmp_path / "proof"
    for name in ("weights.pth", "weights.bin", "disguised.safetensors"):
        (tmp_path / name).write_bytes(pickle.dumps(Boom(str(proof))))
        with pytest.raises(CheckpointError, match=r"is a PyTorch pickle; visattn opens safetensors only.*save_file"):
            load_model("timm:vit_tiny_patch16_224", weights=tmp_path / name, options=TIMM_BASE)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(tiny_hf("vit").config.to_dict()))
    (hf / "pytorch_model.bin").write_bytes(pickle.dumps(Boom(str(proof))))
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin is a PyTorch pickle.*save_pretrained"):
        load_model(hf)
    assert not proof.exists()


def test_a_safetensors_file_whose_first_byte_is_the_pickle_mark_opens(tmp_path: Path) -> None:
    """A header 0x..80 bytes long starts the file with 0x80, the pickle protocol byte: still safetensors."""
    from visattn.sources import load_state_dict, refuse_pickle

    original = tiny_timm("vit")
    path = tmp_path / "w.safetensors"
    for pad in range(256):
        save_file(original.state_dict(), path, metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    refuse_pickle(path)
    model = tiny_timm("vit")
    torch.nn.init.zeros_(model.head.weight)
    load_state_dict(model, path)
    torch.testing.assert_close(model.head.weight, original.head.weight)
    pickle_path = tmp_path / "renamed.safetensors"  # a pickle under a safetensors name: refused by its content
    pickle_path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(CheckpointError, match="is a PyTorch pickle"):
        refuse_pickle(pickle_path)


def test_weights_that_do_not_fit_name_the_first_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    save_file(tiny_timm("vit").state_dict(), tmp_path / "w.safetensors")
    devices, create = [], timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: devices.append(torch.get_default_device().type)
                        or create(*a, **k))
    with pytest.raises(CheckpointError, match=r"^w.safetensors does not fit this architecture: cls_token has "
                                              r"shape \[1, 1, 32\], the model needs \[1, 1, 1024\]$"):
        load_model("timm:vit_large_patch16_224", weights=tmp_path / "w.safetensors")
    assert devices == ["meta"]  # ViT-L's 300M parameters were never allocated for a misfit file
    monkeypatch.setattr(timm, "create_model", create)
    with pytest.raises(CheckpointError, match=r"^w.safetensors does not fit this architecture: cls_token has shape "
                                              r"\[1, 1, 32\], the model needs \[1, 1, 64\]$"):
        load_model("timm:vit_tiny_patch16_224", weights=tmp_path / "w.safetensors", options={**TIMM_BASE, "embed_dim": 64})
    with pytest.raises(CheckpointError, match="it has no tensor reg_token"):
        load_model("timm:vit_tiny_patch16_224", weights=tmp_path / "w.safetensors", options={**TIMM_BASE, "reg_tokens": 2})
    tiny_hf("vit").save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "hidden_size": 64, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match=r"the weights do not fit ViTForImageClassification: \S+ has shape \[\d+(, \d+)*\], the config needs"):
        load_model(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"do not fit ViTForImageClassification: missing key vit\.layers\.2\."):
        load_model(tmp_path / "hf")


@pytest.mark.parametrize("source, options, message", [
    ("timm:no_such_net", {}, "unknown timm architecture 'no_such_net'"),
    ("torchvision:no_such_net", {}, "unknown torchvision classification architecture"),
    ("timm:vit_tiny_patch16_224", {"checkpoint_path": "/etc/passwd"}, "option 'checkpoint_path' is not allowed"),
    ("timm:vit_tiny_patch16_224", {"embed_dim": 10**9}, "option embed_dim=1000000000 is out of bounds"),
    ("timm:vit_tiny_patch16_224", {"depth": [1, 2]}, "option depth must be a number, a string or a boolean"),
    ("hf:../../etc", {}, "is not a Hugging Face repo id"),
    ("nowhere.safetensors", {}, "not found: nowhere.safetensors"),
])
def test_bad_sources_are_one_line(source: str, options: dict, message: str) -> None:
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(source, options=options)
    assert "\n" not in str(e.value)


def test_hostile_hugging_face_config_is_refused_before_building(tmp_path: Path) -> None:
    tiny_hf("vit").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**8}))
    with pytest.raises(CheckpointError, match="config num_hidden_layers=100000000 is out of bounds"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not a Hugging Face image classifier"):
        load_model(tmp_path)


def test_visattn_checkpoints_open_as_before(tmp_path: Path) -> None:
    from visattn import create_model
    from visattn.checkpoint import save_checkpoint

    original = create_model("hybrid_vit", embed_dim=32, depth=1, heads=2).eval()
    save_checkpoint(tmp_path / "h.safetensors", original, classes=list("abcdefghij"), mean=[0.5] * 3, std=[0.5] * 3)
    model, meta = load_model(tmp_path / "h.safetensors")
    same_attention(model, original, torch.randn(1, 3, 32, 32))
    assert meta["classes"] == list("abcdefghij") and meta["image_size"] == 32 and meta["library"] == "visattn"
    save_file(original.state_dict(), tmp_path / "bare.safetensors")
    with pytest.raises(CheckpointError, match="bare.safetensors is a bare state dict: say which architecture"):
        load_model(tmp_path / "bare.safetensors")


def test_timm_pretrained_opens_from_the_hub_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import timm
    from huggingface_hub import constants

    tiny = {k: v for k, v in TIMM_BASE.items() if k != "num_classes"}  # ImageNet's 1,000 classes, as pretrained
    original = timm.create_model("vit_tiny_patch16_224", **tiny).eval()
    (tmp_path / "saved").mkdir()
    save_file(original.state_dict(), tmp_path / "saved" / "model.safetensors")
    cache = hub_cache(tmp_path / "cache", "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", tmp_path / "saved")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, meta = load_model("timm:vit_tiny_patch16_224", pretrained=True, options=tiny)
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), **TOL)
    assert meta["weights"] == "pretrained" and len(meta["classes"]) == 1000 and meta["classes"][0] == "tench"
    with pytest.raises(CheckpointError, match=r"^timm:deit_tiny_patch16_224 pretrained weights \(timm/deit_tiny_patch16"
                                              r"[^)]*\): not in the Hugging Face cache .* HF_HUB_OFFLINE is set"):
        load_model("timm:deit_tiny_patch16_224", pretrained=True, options=tiny)


@pytest.mark.parametrize("source", ["hf:someone/absent", "timm:deit_tiny_patch16_224"])
def test_an_unreachable_hub_is_one_line_without_retries(source: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode, but the hub's host refuses connections: one line from visattn's probe
    (huggingface_hub's own download would retry for about a minute first)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(CheckpointError) as e:
        load_model(source, pretrained=source.startswith("timm:"))
    assert "\n" not in str(e.value) and "127.0.0.1:9 cannot be reached" in str(e.value) and "offline?" in str(e.value)


def test_torchvision_pretrained_offline_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty torch hub cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"^torchvision:vit_b_32 pretrained weights: not in the torch hub cache "
                                              r"and HF_HUB_OFFLINE is set"):
        load_model("torchvision:vit_b_32", pretrained=True)
