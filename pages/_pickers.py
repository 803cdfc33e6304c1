"""The dashboard's pickers (Streamlit): the sidebar model, the image, and the cached
analysis of that image by that model.

* :func:`model_picker` (the sidebar) and :func:`require_model`: shipped checkpoints and
  finished runs, a user's visattn ``.safetensors`` upload, a timm/torchvision architecture
  with an uploaded state dict, a path (checkpoint, Hugging Face folder), a hub id, or
  torchvision's ViT-B/16 (the public mode offers no path, no hub, no weight download and
  smaller uploads). Models are loaded once per process (``st.cache_resource``) keyed on
  the checkpoint's path + mtime + size, the uploads' sha256, or the source, and shared by every
  session: pages only use ``visattn.capture`` (thread-safe) and ``visattn.explain``
  (which locks) on them, never ``.train()`` or hooks.
* :func:`image_source`: a test-set sample (with its true label) or an upload.
* :func:`analysis_for`: one forward pass per (model key, image sha256), kept in a
  byte-bounded memo (:func:`analyses`); changing the query, layer, head, opacity or
  colormap never runs the model again.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import streamlit as st
from torch import nn

from pages._state import IMAGE_SOURCES, guard, init_state, log, one_line, persistent, policy
from visattn import inference, paths, sources, zoo
from visattn.app import views
from visattn.app.memo import ByteLRU
from visattn.errors import VisattnError
from visattn.image_io import MAX_BYTES, MAX_JPEG_PIXELS, MAX_PIXELS
from visattn.tracing import not_captured_line

CHECKPOINT, UPLOAD, ARCHITECTURE, PATH, HUB, TORCHVISION = MODEL_SOURCES = (
    "Checkpoint", "Upload .safetensors", "Architecture + weights", "Path on the server", "Hub id (download)",
    "torchvision ViT-B/16")
WEIGHT_TYPES = ["safetensors", "bin", "pth", "pt", "ckpt", "pkl"]  # the pickles too: each is told how to convert
IMAGE_LIMITS = (f"PNG, JPEG, GIF, WebP, TIFF, BMP… · up to {MAX_BYTES // 2**20} MB; JPEG photos up to "
                f"{MAX_JPEG_PIXELS / 1e6:.0f} MP (decoded reduced), other images up to {MAX_PIXELS / 1e6:.0f} MP · "
                "the model sees a centre crop")


@dataclass(frozen=True)
class ModelHandle:
    model: nn.Module
    meta: dict[str, Any]
    key: str  # cache key: path+mtime+size, upload sha256 or torchvision spec
    label: str


@st.cache_resource(max_entries=4, show_spinner=False)
def _load_model(key: str, _open: Callable[[], tuple[nn.Module, dict[str, Any]]]) -> tuple[nn.Module, dict[str, Any]]:
    return _open()


def _model_summary(meta: dict[str, Any]) -> str:
    acc = meta.get("accuracy")
    parts = [f"**{meta.get('model', '?')}**"]
    if isinstance(acc, (int, float)):
        parts.append(f"{acc:.1%} test accuracy")
    if meta.get("params"):
        parts.append(f"{int(meta['params']):,} parameters")
    if meta.get("epochs"):
        parts.append(f"{meta['epochs']} epochs")
    parts.append(f"{len(meta.get('classes', []))} classes")
    return " · ".join(parts)


def _architecture(limit_mb: int) -> tuple[Callable | None, str, str]:
    """An architecture by name (timm:/torchvision:), its options, and an uploaded state dict:
    (opener, cache key, label); opener None until there is something to open."""
    arch = st.text_input("Architecture", key="arch_name", placeholder="timm:vit_base_patch16_224 or "
                         "torchvision:vit_b_16").strip()
    options = st.text_input("Architecture options", key="arch_options", placeholder="num_classes=10 img_size=224",
                            help="KEY=VALUE arguments of the architecture, separated by spaces").strip()
    up = st.file_uploader("Weights: a .safetensors state dict", type=WEIGHT_TYPES, key="weights_upload",
                          max_upload_size=limit_mb)
    st.caption(f"save_file(model.state_dict(), 'w.safetensors') from safetensors.torch, up to {limit_mb} MB; checked "
               "against the architecture before it is built. No pickles (.bin, .pth). "
               + ("Without weights: random." if policy().downloads else "Weights are needed on this server."))
    names = st.file_uploader("Class names (optional): one per line, or JSON", type=["txt", "json"],
                             key="labels_upload", max_upload_size=1)
    if not arch:
        return None, "", ""
    if arch.split(":", 1)[0] not in ("timm", "torchvision"):
        st.error(f"{arch}: an architecture is timm:NAME or torchvision:NAME")
        return None, "", ""
    opts = sources.parse_options(options.split(), flag="an option")
    if up is None:
        if not policy().downloads:
            return None, "", ""
        return partial(sources.load_model, arch, options=opts), f"arch:{arch}:{options}:random", f"{arch} (random weights)"
    data = up.getvalue()
    labels = (names.name, names.getvalue()) if names is not None else None
    return (partial(sources.load_with_upload, arch, data, up.name, options=opts, labels=labels,
                    max_bytes=limit_mb * 2**20),
            f"arch:{arch}:{options}:{views.sha256(data)}:{views.sha256(labels[1]) if labels else ''}",
            f"{arch} + {up.name}")


def _hub() -> tuple[Callable | None, str, str]:
    """A hub id: ``hf:OWNER/NAME``, or ``timm:``/``torchvision:`` pretrained (cache first)."""
    text = st.text_input("Hub id", key="hub_id", placeholder="hf:google/vit-base-patch16-224 or "
                         "timm:vit_base_patch16_224").strip()
    st.caption("From the local cache when it is there, else downloaded (safetensors and configs); offline, it says so.")
    if not text:
        return None, "", ""
    kind = text.split(":", 1)[0]
    if kind not in ("hf", "timm", "torchvision"):
        st.error(f"{text}: a hub id is hf:OWNER/NAME, timm:ARCH or torchvision:ARCH")
        return None, "", ""
    return partial(sources.load_model, text, pretrained=kind != "hf"), f"hub:{text}", f"{text} (pretrained)"


def _server_path() -> tuple[Callable | None, str, str]:
    """A checkpoint or Hugging Face folder on the server, or a SOURCE string (lab mode)."""
    text = st.text_input("Checkpoint path or SOURCE", key="checkpoint_path",
                         placeholder="runs/my_run.safetensors, a Hugging Face folder, timm:ARCH, hf:OWNER/NAME").strip()
    if text.split(":", 1)[0] in ("timm", "torchvision", "hf"):
        return partial(zoo.load_model, text), text, text  # built by its library (hf: from the hub cache first)
    if not text:
        return None, "", ""
    p = Path(text).expanduser()
    p = p if p.is_absolute() else paths.root() / p
    if p.is_dir() and (p / "config.json").is_file():  # save_pretrained layout
        return partial(zoo.load_model, str(p)), f"{views.checkpoint_key(p / 'config.json')}:{p}", text
    if not p.is_file():
        st.error(f"not found: {text} (a checkpoint, a Hugging Face folder, timm:ARCH or hf:OWNER/NAME)")
        return None, "", ""
    return partial(zoo.load_model, str(p)), views.checkpoint_key(p), text


def model_picker() -> ModelHandle | None:
    """The sidebar model choice; stores and returns a :class:`ModelHandle` (None: none yet)."""
    init_state()
    handle = None
    with st.sidebar:
        st.header("Model")
        allowed = policy()
        sources_here = [s for s in MODEL_SOURCES if (allowed.server_paths or s != PATH) and (allowed.downloads or s != HUB)]
        source = st.radio("Model source", sources_here, key="model_source")
        opener: Callable | None = None
        key = label = ""
        limit = allowed.checkpoint_upload_bytes // 2**20
        with guard("the model source"):
            if source == CHECKPOINT:
                checkpoints = views.list_checkpoints()
                if not checkpoints:
                    st.info("No checkpoint yet in checkpoints/ or runs/. The default one appears after its first "
                            "training epoch; meanwhile pick the torchvision ViT or upload a checkpoint.")
                else:
                    label = st.selectbox("Checkpoint", list(checkpoints), key="checkpoint_label",
                                         format_func=lambda lab: views.describe_checkpoint(lab, checkpoints[lab]))
                    path = checkpoints[label]["path"]
                    opener, key = partial(zoo.load_model, path), views.checkpoint_key(path)
            elif source == UPLOAD:
                up = st.file_uploader("Your visattn checkpoint", type=["safetensors"], key="checkpoint_upload",
                                      max_upload_size=limit)
                st.caption(f".safetensors written by visattn (no pickles), up to {limit} MB; "
                           "checked before any model is built. A timm or torchvision state dict: "
                           f"choose “{ARCHITECTURE}”.")
                if up is not None:
                    data = up.getvalue()
                    opener, key, label = partial(zoo.load_model, data), f"upload:{views.sha256(data)}", up.name
            elif source == ARCHITECTURE:
                opener, key, label = _architecture(limit)
            elif source == PATH:
                opener, key, label = _server_path()
            elif source == HUB:
                opener, key, label = _hub()
            else:
                weights = st.radio("Weights", ("none", "DEFAULT") if allowed.downloads else ("none",),
                                   key="vit_weights", horizontal=True,
                                   format_func=lambda w: "random (offline)" if w == "none" else "ImageNet (download)")
                key = f"torchvision:vit_b_16:{weights}"
                opener = partial(zoo.load_model, key)
                label = f"torchvision vit_b_16 ({'random weights' if weights == 'none' else 'ImageNet weights'})"
        if opener is not None and key:
            try:
                with st.spinner("Loading the model…"):
                    model, meta = _load_model(key, opener)
                handle = ModelHandle(model, meta, key, label)
                st.caption(_model_summary(meta))
            except VisattnError as e:
                st.error(one_line(e))
            except Exception as e:  # not a library refusal: log it, one line on the page
                log.exception("loading a model")
                st.error(f"cannot load this model: {type(e).__name__}: {one_line(e)}")
    st.session_state["model_handle"] = handle
    return handle


def require_model() -> ModelHandle:
    """The sidebar's model (``pages.main`` draws the picker before every page); stops
    the page with an ``st.info`` when there is none."""
    handle = st.session_state.get("model_handle")
    if handle is None:
        st.info("Choose a model in the sidebar to begin.")
        st.stop()
    return handle


# ----------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImageChoice:
    data: bytes
    sha: str
    name: str
    label: int | None = None  # true class index (test-set samples)
    label_name: str | None = None


@st.cache_resource(max_entries=2, show_spinner=False)
def test_split(path: str):
    """The test split at ``path`` (decoded once per process)."""
    return views.load_test_split(path)


def test_split_or_none():
    """The test split, or None when the data set is absent."""
    path = paths.data()
    if not views.data_available(path):
        return None
    with st.spinner("Reading the test set…"):
        return test_split(str(path))


def image_source(key: str = "image") -> ImageChoice | None:
    """Choose a test-set sample (with its true label) or upload an image; None: no image."""
    source = persistent(st.radio, "Image", "image_source", options=list(IMAGE_SOURCES), horizontal=True)
    if source == IMAGE_SOURCES[0]:
        split = None
        with guard("the test set"):
            split = test_split_or_none()
        if split is None:
            st.info(f"The test set is not available at {paths.data()} (set VISATTN_DATA to an image-folder "
                    "data set with a test/ split). Upload an image instead.")
            return None
        n = len(split)
        st.session_state["sample_index"] = min(int(st.session_state["sample_index"]), n - 1)
        c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
        with c1:
            index = persistent(st.number_input, f"Test image (0–{n - 1})", "sample_index", min_value=0,
                               max_value=n - 1, step=1)

        def shuffle() -> None:
            st.session_state["sample_index"] = int(np.random.default_rng().integers(n))

        c2.button("Random", key=f"{key}_random", on_click=shuffle, help="pick a random test image")
        index = int(index)
        label = int(split.labels[index])
        data = views.sample_png(split, index)
        choice = ImageChoice(data, views.sha256(data), f"test image {index}", label, split.classes[label])
        st.caption(f"True label: **{choice.label_name}**")
        return choice
    up = st.file_uploader("Upload an image", key=f"{key}_upload", max_upload_size=MAX_BYTES // 2**20,
                          help="Any common image format; it is checked before use.")
    st.caption(IMAGE_LIMITS)
    if up is not None:
        data = up.getvalue()
        choice = ImageChoice(data, views.sha256(data), up.name)
        st.session_state["uploaded_image"] = choice
        return choice
    choice = st.session_state.get("uploaded_image")
    if choice is None:
        st.info("Upload an image to begin, or switch to a test-set sample.")
        return None
    st.caption(f"Using your earlier upload: {choice.name}")
    return choice


@st.cache_resource(show_spinner=False)
def analyses() -> ByteLRU:
    """The analyses of this server process, by (model key, image sha256), bounded by bytes:
    ``$VISATTN_ANALYSIS_CACHE_MB`` (default 512)."""
    return ByteLRU(int(float(os.environ.get("VISATTN_ANALYSIS_CACHE_MB") or 512) * 2**20))


def analysis_for(handle: ModelHandle, choice: ImageChoice):
    """The cached :class:`visattn.inference.Analysis` of this image by this model, or None
    after showing one ``st.error`` line (bad image)."""
    try:
        with st.spinner("Running the model…"):
            return analyses().get((handle.key, choice.sha),
                                  lambda: inference.analyse(handle.model, handle.meta, choice.data),
                                  size=lambda a: a.nbytes)
    except VisattnError as e:
        st.error(one_line(e))
    except Exception as e:
        log.exception("analysing an image")
        st.error(f"cannot analyse this image: {type(e).__name__}: {one_line(e)}")
    return None


def image_and_analysis(handle: ModelHandle, key: str, column) -> tuple[ImageChoice, Any]:
    """The image source widget drawn in ``column``, then its cached analysis; stops the page
    (after the widget's message or one ``st.error`` line) when there is no usable image."""
    with column:
        choice = image_source(key)
    if choice is None:
        st.stop()
    analysis = analysis_for(handle, choice)
    if analysis is None:
        st.stop()
    if analysis.trace.skipped:  # attention the capture could not see: named, never silently missing
        st.warning(not_captured_line(analysis.trace.skipped))
    return choice, analysis
