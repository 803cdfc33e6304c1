"""The sidebar opens other libraries' models (lab mode): a Hugging Face folder by its path and
timm:ARCH by name; a missing folder is one line."""
from __future__ import annotations

import pytest

from tests.foreign_models import tiny_hf
from tests.test_dashboard import app, errors, problems

pytest.importorskip("transformers")


def test_sidebar_opens_a_hugging_face_folder_and_a_timm_architecture(tmp_path):
    tiny_hf("dinov2_registers").save_pretrained(tmp_path / "hf")
    at = app("explore").run()
    at.radio(key="model_source").set_value("Path on the server").run()
    at.text_input(key="checkpoint_path").set_value(str(tmp_path / "hf")).run(timeout=120)
    assert not at.exception, problems(at)
    handle = at.session_state["model_handle"]
    assert handle.meta["library"] == "transformers" and handle.meta["classes"][0] == "class 0", errors(at)
    at.text_input(key="checkpoint_path").set_value("timm:vit_tiny_patch16_224").run(timeout=120)
    assert not at.exception, problems(at)
    assert at.session_state["model_handle"].meta["library"] == "timm"
    at.text_input(key="checkpoint_path").set_value(str(tmp_path / "absent")).run()
    assert at.session_state["model_handle"] is None
    assert any(e.startswith("not found:") and "\n" not in e for e in errors(at)), errors(at)
