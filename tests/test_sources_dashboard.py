"""The sidebar opens other libraries' models: an architecture by name with an uploaded
state dict (real files, reopened exactly; pickles and misfits refused in one line), a Hugging
Face folder or a SOURCE by path (lab mode), and a hub id from a local cache while offline
(one line when it is not cached). The public mode offers neither paths nor the hub."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.foreign_models import HF_FAMILIES, SIDE, TIMM_BASE, TINY_TIMM, lively, tiny_hf, tiny_timm
from tests.test_dashboard import app, errors, problems, sample_photo, upload
from tests.test_sources import COMMIT, Boom, hub_cache, same_attention

pytest.importorskip("timm")
pytest.importorskip("transformers")
ARCH = "timm:deit_tiny_distilled_patch16_224"
OPTIONS = " ".join(f"{k}={v}" for k, v in TIMM_BASE.items())


def sidebar_source(at, source: str):
    """``at`` run with ``source`` chosen in the sidebar from the start (no other model is
    opened and analysed on the way)."""
    at.session_state["model_source"] = source
    return at.run()


def test_sidebar_opens_a_hugging_face_folder_and_a_timm_architecture(tmp_path):
    tiny_hf("dinov2_registers").save_pretrained(tmp_path / "hf")
    at = sidebar_source(app("explore"), "Path on the server")
    at.text_input(key="checkpoint_path").set_value(str(tmp_path / "hf")).run(timeout=120)
    assert not at.exception, problems(at)
    handle = at.session_state["model_handle"]
    assert handle.meta["library"] == "transformers" and handle.meta["classes"][0] == "class 0", errors(at)
    at.text_input(key="checkpoint_path").set_value("timm:test_vit").run(timeout=120)  # timm's own tiny test ViT
    assert not at.exception, problems(at)
    assert at.session_state["model_handle"].meta["library"] == "timm"
    at.text_input(key="checkpoint_path").set_value(str(tmp_path / "absent")).run()
    assert at.session_state["model_handle"] is None
    assert any(e.startswith("not found:") and "\n" not in e for e in errors(at)), errors(at)


@pytest.mark.parametrize("library, family", [("timm", f) for f in TINY_TIMM] + [("hf", f) for f in HF_FAMILIES])
def test_every_family_opens_in_the_sidebar_with_exact_capture(library: str, family: str, tmp_path):
    """Each family saved as its users save it (a timm state dict uploaded with its architecture, a
    Hugging Face ``save_pretrained`` folder by path) opens in the sidebar, Explore draws it without an
    error, and the page's model captures the same attention as the original (1e-5)."""
    if library == "timm":
        original = tiny_timm(family)
        save_file(original.state_dict(), tmp_path / "w.safetensors")
        arch, overrides = TINY_TIMM[family]
        at = sidebar_source(app("explore"), "Architecture + weights")
        at.text_input(key="arch_name").set_value(f"timm:{arch}")
        at.text_input(key="arch_options").set_value(" ".join(f"{k}={v}" for k, v in {**TIMM_BASE, **overrides}.items()))
        at.file_uploader(key="weights_upload").set_value(
            ("w.safetensors", (tmp_path / "w.safetensors").read_bytes(), "application/octet-stream"))
        at.run(timeout=120)
    else:
        original = tiny_hf(family)
        original.save_pretrained(tmp_path / "hf")
        at = sidebar_source(app("explore"), "Path on the server")
        at.text_input(key="checkpoint_path").set_value(str(tmp_path / "hf")).run(timeout=120)
    assert not at.exception and not at.error, (problems(at), errors(at))
    handle = at.session_state["model_handle"]
    assert handle.meta["library"] == {"timm": "timm", "hf": "transformers"}[library]
    same_attention(handle.model, original, torch.randn(2, 3, SIDE, SIDE))


def test_architecture_with_uploaded_weights(tmp_path):
    """A distilled DeiT saved as its user saves it, uploaded: the sidebar's model gives the
    same logits; a pickle (that would write a file when unpickled) and a misfit are one line."""
    original = tiny_timm("deit_distilled")
    save_file(original.state_dict(), tmp_path / "w.safetensors")
    at = sidebar_source(app("explore"), "Architecture + weights")
    at.text_input(key="arch_name").set_value(ARCH)
    at.text_input(key="arch_options").set_value(OPTIONS)
    at.file_uploader(key="weights_upload").set_value(("w.safetensors", (tmp_path / "w.safetensors").read_bytes(),
                                                      "application/octet-stream"))
    at.run(timeout=120)
    assert not at.exception and not at.error, (problems(at), errors(at))
    handle = at.session_state["model_handle"]
    assert handle.meta["weights"] == "w.safetensors" and handle.meta["library"] == "timm"
    assert handle.meta["classes"] == ["0", "1", "2", "3", "4"]  # no labels file: indices
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(handle.model(x), original(x), atol=1e-5, rtol=1e-5)
    at.file_uploader(key="labels_upload").set_value(("classes.txt", b"cat\ndog\nfox\nowl\nbee\n", "text/plain"))
    at.run()
    assert at.session_state["model_handle"].meta["classes"] == ["cat", "dog", "fox", "owl", "bee"], errors(at)
    at.file_uploader(key="labels_upload").set_value(("short.txt", b"cat\ndog\n", "text/plain"))
    at.run()
    assert errors(at) == ["short.txt has 2 labels; the model has 5 classes"]
    at.file_uploader(key="labels_upload").set_value(None)

    proof = tmp_path / "proof"
    at.file_uploader(key="weights_upload").set_value(("w.pth", pickle.dumps(Boom(str(proof))), "application/octet-stream"))
    at.run()
    assert at.session_state["model_handle"] is None and not at.exception, problems(at)
    (line,) = errors(at)
    assert line.startswith("w.pth is a PyTorch pickle; visattn opens safetensors only") and "\n" not in line
    assert "save_file(torch.load('w.pth', weights_only=True), 'w.safetensors')" in line
    assert not proof.exists()

    at.text_input(key="arch_options").set_value(OPTIONS.replace("embed_dim=32", "embed_dim=64"))
    at.file_uploader(key="weights_upload").set_value(("w.safetensors", (tmp_path / "w.safetensors").read_bytes(),
                                                      "application/octet-stream"))
    at.run()
    assert errors(at) == ["w.safetensors does not fit this architecture: cls_token has shape [1, 1, 32], the model "
                          "needs [1, 1, 64]"]
    at.text_input(key="arch_options").set_value("embed_dim")
    at.run()
    assert errors(at) == ["an option expects KEY=VALUE, got 'embed_dim'"]


def test_hub_id_opens_from_the_cache_offline(tmp_path, monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import constants

    tiny_hf("vit").save_pretrained(tmp_path / "saved")
    cache = hub_cache(tmp_path / "cache", f"someone/tiny-vit-{COMMIT[:6]}", tmp_path / "saved")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    at = sidebar_source(app("explore"), "Hub id (download)")
    at.text_input(key="hub_id").set_value(f"hf:someone/tiny-vit-{COMMIT[:6]}").run(timeout=120)
    assert not at.exception and not at.error, (problems(at), errors(at))
    assert at.session_state["model_handle"].meta["classes"][:2] == ["class 0", "class 1"]
    for absent in ("hf:someone/not-cached", "timm:deit_tiny_patch16_224"):
        at.text_input(key="hub_id").set_value(absent).run()
        assert at.session_state["model_handle"] is None and not at.exception, problems(at)
        (line,) = errors(at)
        assert line.startswith(absent) and "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE" in line


def test_public_mode_offers_no_server_path_and_no_hub(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("VISATTN_PUBLIC", "1")
    at = app("explore").run()
    options = at.radio(key="model_source").options
    assert "Path on the server" not in options and "Hub id (download)" not in options
    at = sidebar_source(at, "Architecture + weights")
    at.text_input(key="arch_name").set_value(ARCH).run()
    assert at.session_state["model_handle"] is None and not at.error, errors(at)  # no weights: nothing is built
    assert any("up to 32 MB" in c.value and "Weights are needed on this server" in c.value for c in at.caption)


def test_swin_layers_are_named_in_one_line_on_the_pages(tmp_path):
    """A Hugging Face Swin opened by path: its windowed attention is refused, and Explore and
    Learn say so in one warning line naming every layer (not "no attention layers")."""

    tiny_hf("swin").save_pretrained(tmp_path / "swin")
    layers = "model.swin.encoder.layers.0.blocks.0.attention, model.swin.encoder.layers.1.blocks.0.attention"
    for page in ("explore", "learn"):
        at = app(page)
        at.session_state["model_source"], at.session_state["image_source"] = "Path on the server", "Upload an image"
        at.run()
        at.text_input(key="checkpoint_path").set_value(str(tmp_path / "swin")).run(timeout=120)
        upload(at, *sample_photo(), key=f"{page}_upload")
        assert not at.exception and not at.error, (problems(at), errors(at))
        assert [w.value for w in at.warning] == [f"not captured: {layers} (windowed attention: Swin windows are not "
                                                 "placed on the image)"]
        assert any(i.value.startswith("No attention layer of this model could be captured") for i in at.info)


def test_compare_draws_transformer_relevance_of_a_hugging_face_model(tmp_path, shown):
    """A DINOv2 with registers (its head reads CLS and the mean of the patches) opened by
    path: Compare draws GAE and transformer attribution, each the library's map, and says
    "not available" for nothing."""
    from visattn import inference, maps
    from visattn.app import evaluation, figures
    from visattn.explain import METHODS

    lively(tiny_hf("dinov2_registers")).save_pretrained(tmp_path / "hf")
    at = app("compare")
    at.session_state["model_source"], at.session_state["image_source"] = "Path on the server", "Upload an image"
    at.run()
    at.text_input(key="checkpoint_path").set_value(str(tmp_path / "hf")).run(timeout=120)
    name, photo = sample_photo()
    upload(at, name, photo, key="compare_upload")
    assert not at.exception and not at.error, (problems(at), errors(at))
    handle = at.session_state["model_handle"]
    analysis = inference.analyse(handle.model, handle.meta, photo)
    drawn = [shown(i) for i in at.image if not (i.proto.imgs[0].caption or "").startswith("what the model sees")]
    missing = [i.value for i in at.info if i.value.startswith("Not available")]
    assert len(drawn) + len(missing) == len(METHODS)  # each method: its map or one line
    for method in ("gae", "transformer_attribution"):  # the first four methods all have maps
        e = evaluation.explain_one(handle.model, analysis.tensor, method, analysis.predicted)
        assert e is not None and float(e.map.max()) > float(e.map.min())
        expected = figures.overlay_view(analysis, maps.normalise(e.map), 0.5, "inferno")
        assert np.abs(drawn[list(METHODS).index(method)].astype(int) - expected).mean() < 4  # JPEG
