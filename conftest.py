"""Names the docstring examples of ``visattn`` use (``pytest --doctest-modules visattn``,
part of ``make test``): small models and their traces, built once per module that asks."""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from visattn import create_model
from visattn.tracing import capture


def _sa_cnn_trace() -> dict[str, Any]:
    torch.manual_seed(0)
    trace = capture(create_model("sa_cnn").eval(), torch.rand(1, 3, 32, 32))
    return {"trace": trace, "site": trace.attention["stages.1.1"]}


def _explain() -> dict[str, Any]:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    return {"model": create_model("sa_cnn", widths=(8, 16, 16), heads=2).eval(), "image": x[:1], "images": x,
            "targets": [0, 1, 2, 3], "create_model": create_model}


def _maps() -> dict[str, Any]:
    torch.manual_seed(0)
    hybrid = capture(create_model("hybrid_vit").eval(), torch.rand(1, 3, 32, 32))
    vit = capture(create_model("vit_b_16", image_size=64, num_classes=10).eval(), torch.rand(1, 3, 64, 64))
    return {**_sa_cnn_trace(), "hybrid_trace": hybrid, "vit_site": next(iter(vit.attention.values()))}


def _faithfulness() -> dict[str, Any]:
    from visattn.faithfulness import random_map

    return {**_explain(), "maps": random_map((4, 32, 32), seed=0)}


def _plotting() -> dict[str, Any]:
    from visattn.maps import query_maps

    names = _sa_cnn_trace()
    return {**names, "image": torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8).numpy(),
            "maps": query_maps(names["site"], 0, 27), "query_maps": query_maps}


NAMESPACES: dict[str, Callable[[], dict[str, Any]]] = {
    "visattn.maps": _maps, "visattn.app.lesson": _sa_cnn_trace, "visattn.explain": _explain,
    "visattn.faithfulness": _faithfulness, "visattn.plotting": _plotting,
}
_BUILT: dict[str, dict[str, Any]] = {}


@pytest.fixture(autouse=True)
def _doctest_names(request: pytest.FixtureRequest, doctest_namespace: dict[str, Any]) -> None:
    """Give a docstring example the names its module's examples use (nothing for a test)."""
    dtest = getattr(request.node, "dtest", None)
    if dtest is None:
        return
    module = dtest.globs.get("__name__", "")
    if module in NAMESPACES and module not in _BUILT:
        _BUILT[module] = NAMESPACES[module]()
    doctest_namespace.clear()
    doctest_namespace.update(_BUILT.get(module, {}))
