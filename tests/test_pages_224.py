"""Explore, Compare, Models and Learn on a 224-px model (a tiny timm ViT-*/16: a 14×14 grid),
opened through the sidebar from an uploaded state dict, on a non-square photo: the maps are
drawn over the whole photo where the model's centre crop came from (checked pixel by pixel
against the library, read back from the images the page shows), Grad-CAM is not zero."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from tests.conftest import needs_data
from tests.test_dashboard import app, errors, problems, upload
from tests.test_learn_break import shown_vs_library
from visattn import inference, maps
from visattn.app import evaluation, figures, views
from visattn.explain import METHODS, default_cam_layer
from visattn.image_io import crop_box

timm = pytest.importorskip("timm")
ARCH, OPTIONS = "timm:vit_tiny_patch16_224", "embed_dim=32 depth=2 num_heads=2 num_classes=10"
PHOTO_WH = (400, 250)
TIMEOUT = 180


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> bytes:
    model = timm.create_model("vit_tiny_patch16_224", embed_dim=32, depth=2, num_heads=2, num_classes=10)
    path = tmp_path_factory.mktemp("vit224") / "vit224.safetensors"
    save_file(model.state_dict(), path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def photo() -> bytes:
    """A 400×250 photo with structure everywhere (so the darkened margins show)."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(40, 256, (10, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(blocks).resize(PHOTO_WH, Image.Resampling.NEAREST).save(buf, "PNG")
    return buf.getvalue()


def open_224(page: str, weights: bytes, photo_upload: bool = True, arch: str = ARCH, options: str = OPTIONS):
    """The dashboard on ``page`` with the 224-px model ``arch`` uploaded in the sidebar; in
    upload mode when ``photo_upload`` (no test image and no other model is analysed on the way)."""
    at = app(page)
    at.session_state["model_source"] = "Architecture + weights"
    if photo_upload:
        at.session_state["image_source"] = "Upload an image"
    at.run()
    at.text_input(key="arch_name").set_value(arch)
    at.text_input(key="arch_options").set_value(options)
    at.file_uploader(key="weights_upload").set_value(("vit224.safetensors", weights, "application/octet-stream"))
    at.run(timeout=TIMEOUT)
    assert not at.exception and not at.error, (problems(at), errors(at))
    assert at.session_state["model_handle"].meta["image_size"] == 224
    return at


def with_photo(at, photo: bytes, key: str):
    upload(at, "photo.png", photo, key=f"{key}_upload")
    assert not at.exception and not at.error, (problems(at), errors(at))
    return at


def image_captioned(at, caption: str):
    return next(i for i in at.image if caption in (i.proto.imgs[0].caption or ""))


def test_explore_on_a_224_model_draws_over_the_whole_photo(weights, photo, shown):
    at = with_photo(open_224("explore", weights), photo, "explore")
    handle = at.session_state["model_handle"]
    analysis = inference.analyse(handle.model, handle.meta, photo)
    assert {s.grid for s in analysis.trace.attention.values()} == {(14, 14)}
    assert any("14×14 grid" in c.value for c in at.caption)
    w, h = PHOTO_WH
    assert analysis.photo.shape == (h, w, 3)
    assert analysis.box == pytest.approx(crop_box(w, h, 224, handle.meta["resize"]))
    roll = image_captioned(at, "attention rollout")
    expected = figures.overlay_view(analysis, maps.normalise(views.rollout_or_none(analysis.trace)), 0.5, "inferno")
    got = shown(roll)
    assert got.shape == expected.shape == (h, w, 3)  # the whole photo, not the 224-px crop
    left, top, right, bottom = (int(round(v)) for v in analysis.box)
    assert 0 < left and right < w  # the model saw a centre crop: the sides are outside it
    assert np.abs(got.astype(int) - expected).mean() < 4  # JPEG
    outside = np.concatenate([got[:, :left - 2], got[:, right + 2:]], axis=1).astype(int)
    darkened = (np.concatenate([analysis.photo[:, :left - 2], analysis.photo[:, right + 2:]], axis=1) * 0.45).round()
    assert np.abs(outside - darkened).mean() < 4

    at.toggle(key="_w_whole_photo").set_value(False).run(timeout=TIMEOUT)
    assert shown(image_captioned(at, "attention rollout")).shape == (256, 256, 3)  # the model's input, enlarged
    assert not at.exception and not at.error, (problems(at), errors(at))


def test_compare_on_a_224_model(weights, photo, shown):
    at = with_photo(open_224("compare", weights), photo, "compare")
    handle = at.session_state["model_handle"]
    assert at.session_state["cam_layer"] == default_cam_layer(handle.model) == "blocks.1"
    analysis = inference.analyse(handle.model, handle.meta, photo)
    cam = evaluation.explain_one(handle.model, analysis.tensor, "grad_cam", analysis.predicted, "blocks.1")
    assert cam.map.shape == (224, 224) and float(cam.map.max()) > 0  # the grid tokens' gradient is not zero
    drawn = [shown(i) for i in at.image if not (i.proto.imgs[0].caption or "").startswith("what the model sees")]
    assert len(drawn) >= 5 and all(d.shape == (PHOTO_WH[1], PHOTO_WH[0], 3) for d in drawn), [d.shape for d in drawn]
    assert [i.value for i in at.info if "Not available" in i.value] == []
    for name in ("gae", "transformer_attribution", "attnlrp"):  # made for transformers: timm's ViT blocks are known
        e = evaluation.explain_one(handle.model, analysis.tensor, name, analysis.predicted)
        expected = figures.overlay_view(analysis, maps.normalise(e.map), 0.5, "inferno")
        assert np.abs(drawn[list(METHODS).index(name)].astype(int) - expected).mean() < 4  # JPEG


def tiny_torchvision_vit(**options) -> "torch.nn.Module":
    """torchvision's ViT class at 224 px, 2 blocks of width 32 (its ``vit_b_16`` builder fixes
    the depth, so the test serves this one under that name); the head is not torchvision's zeros."""
    import torch
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(options.get("image_size", 224), 16, num_layers=2, num_heads=2, hidden_dim=32,
                              mlp_dim=64, num_classes=options.get("num_classes", 1000))
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)
    return model


def test_compare_shows_attnlrp_and_its_conservation_on_a_torchvision_vit(photo, shown, monkeypatch, tmp_path):
    """A torchvision ViT through the sidebar (architecture + uploaded weights): Compare draws
    AttnLRP's map (the library's, read back pixel by pixel) with its conservation figure
    beside it, the library's own, and every relevance method applies."""
    import torchvision

    from visattn import attnlrp

    built = torchvision.models.get_model
    monkeypatch.setattr(torchvision.models, "get_model", lambda arch, **kw: tiny_torchvision_vit(
        **{k: v for k, v in kw.items() if k != "weights"}) if arch == "vit_b_16" else built(arch, **kw))
    save_file(tiny_torchvision_vit(num_classes=10).state_dict(), tmp_path / "tv.safetensors")
    at = open_224("compare", (tmp_path / "tv.safetensors").read_bytes(), arch="torchvision:vit_b_16",
                  options="num_classes=10")
    at = with_photo(at, photo, "compare")
    handle = at.session_state["model_handle"]
    assert attnlrp.supports(handle.model)
    analysis = inference.analyse(handle.model, handle.meta, photo)
    e = evaluation.explain_one(handle.model, analysis.tensor, "attnlrp", analysis.predicted)
    assert e is not None and float(e.map.max()) > 0
    assert not [i.value for i in at.info if "Not available" in i.value]  # GAE, transformer attribution, AttnLRP
    titles = [s.value for s in at.subheader]
    assert METHODS["attnlrp"].label in titles
    figure = f"conservation |Σ relevance − logit| / |logit| = {float(e.conservation[0]):.2%}"
    assert figure in [c.value for c in at.caption], [c.value for c in at.caption if "conservation" in c.value]
    drawn = [i for i in at.image if not (i.proto.imgs[0].caption or "").startswith("what the model sees")]
    expected = figures.overlay_view(analysis, maps.normalise(e.map), 0.5, "inferno")
    assert min(np.abs(shown(i).astype(int) - expected).mean() for i in drawn) < 4  # JPEG


def test_learn_on_a_224_model(weights, photo):
    at = with_photo(open_224("learn", weights), photo, "learn")
    assert any("<b>14×14</b> grid of positions (197 in all)" in m.value for m in at.markdown)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Sum of all the weights"] == "1.000000"
    assert any(c.value.startswith("Largest difference from the weights the layer really used") for c in at.caption)
    assert any("learned absolute `pos_embed` (1×197×32)" in c.value for c in at.caption)  # step 6 names the table
    at.toggle(key="_w_break_positions").set_value(True)
    at.select_slider(key="_w_break_scale").set_value(0.2)
    at.run(timeout=TIMEOUT)
    assert not at.exception and not at.error, (problems(at), errors(at))
    shown_vs_library(at, photo, "scores ×0.2 · positions off", scale=0.2, positions=False)


@needs_data()
def test_models_on_a_224_model(weights):
    at = open_224("models", weights, photo_upload=False)
    assert not at.exception and not at.error, (problems(at), errors(at))
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Accuracy on this sample"].endswith("%")
    keys = [c.proto.id for c in at.get("plotly_chart")]
    assert len(keys) >= 3  # per class, confusion, head statistics
    assert any("Averaged over 64 test images" in m.value for m in at.markdown)
