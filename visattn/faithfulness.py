"""How faithful is an attribution map? Deletion/insertion curves (Petsiuk et al. 2018,
RISE), a random-map floor, and the cascading model-randomisation sanity check
(Adebayo et al. 2018); ROAD and Chefer et al.'s positive/negative perturbation are in
:mod:`visattn.perturbation` and scored here beside them.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.transforms.functional import gaussian_blur

from visattn.errors import VisattnError

RANDOM = "random"  # the floor: a fixed random map, scored beside the methods
PROTOCOLS = ("deletion_insertion", "road", "perturbation")
MAP_BATCH = 32  # images per explanation call in evaluate_methods (each method takes a batch)


def _device(model: nn.Module, like: Tensor) -> torch.device:
    return next(model.parameters(), like).device


def _baseline(images: Tensor, kind: str) -> Tensor:
    """What removed pixels become: a strong Gaussian blur (kernel ≈ H/3, σ ≈ H/6.4,
    i.e. 11 and 5 at 32 px; separable) or each image's per-channel mean."""
    if kind == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    if kind != "blur":
        raise VisattnError(f"unknown baseline {kind!r}; use 'blur' or 'mean'")
    k = 2 * (min(images.shape[-2:]) // 6) + 1
    sigma = k / 2.2
    return gaussian_blur(gaussian_blur(images, [k, 1], [sigma, sigma]), [1, k], [sigma, sigma])


def deletion_insertion(model: nn.Module, images: Tensor, maps: np.ndarray | Tensor, targets: Tensor | list[int],
                       steps: int = 16, baseline: str = "blur", batch_size: int = 64) -> dict[str, np.ndarray]:
    """Deletion and insertion curves and their areas (RISE, Petsiuk et al. 2018).

    Pixels are ranked by the map, highest first. Step i of ``steps`` replaces the top
    i/steps of them with the baseline (deletion: a good map makes the target probability
    fall fast, low AUC) or reveals them on top of the baseline (insertion: it rises fast,
    high AUC). All B·(steps+1)·2 perturbed images are built with vectorised masks and run
    ``batch_size`` at a time: ⌈2·B·(steps+1) / batch_size⌉ forwards in all.

    Args:
        model: classifier. images: (B, 3, H, W). maps: (B, H, W) attribution maps.
        targets: (B,) classes whose softmax probability is tracked.
        steps: curve resolution. baseline: "blur" or "mean". batch_size: images per forward.

    Returns:
        dict with "deletion_curve" / "insertion_curve" (B, steps+1), "deletion_auc" /
        "insertion_auc" (B,) by the trapezoid rule over "fractions" (steps+1,) in [0, 1].

    >>> r = deletion_insertion(model, images, maps, targets, steps=8)
    >>> r["deletion_curve"].shape, r["deletion_auc"].shape
    ((4, 9), (4,))
    """
    device = _device(model, images)
    x = images.detach().float().to(device)
    b, _, h, w = x.shape
    m = torch.as_tensor(np.asarray(maps, dtype=np.float32) if not isinstance(maps, Tensor) else maps)
    if tuple(m.shape) != (b, h, w) or not torch.isfinite(m).all():
        raise VisattnError(f"maps must be finite, shaped {(b, h, w)}; got {tuple(m.shape)}")
    m = m.detach().float().reshape(b, h * w).to(device)
    t = torch.as_tensor(targets, device=device).long().reshape(b)
    order = m.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(h * w, device=device).expand(b, -1))
    counts = torch.round(torch.linspace(0, 1, steps + 1, device=device) * h * w).long()  # (S+1,)
    base = _baseline(x, baseline)
    per_kind = b * (steps + 1)
    probs = torch.empty(2 * per_kind, device=device)
    with torch.no_grad():
        for start in range(0, 2 * per_kind, batch_size):
            idx = torch.arange(start, min(start + batch_size, 2 * per_kind), device=device)
            deleting = (idx < per_kind)[:, None, None, None]  # first half deletion, then insertion
            img, step = (idx % per_kind) // (steps + 1), idx % (steps + 1)
            chosen = (rank[img] < counts[step][:, None]).reshape(-1, 1, h, w)  # top pixels so far
            batch = torch.where(chosen == deleting, base[img], x[img])  # deleted, or not yet inserted
            probs[idx] = model(batch).float().softmax(dim=1).gather(1, t[img][:, None])[:, 0]
    curves = probs.reshape(2, b, steps + 1).cpu().numpy()
    fractions = (counts.float() / (h * w)).cpu().numpy()

    def auc(y: np.ndarray) -> np.ndarray:
        return ((y[:, 1:] + y[:, :-1]) / 2 * np.diff(fractions)).sum(axis=1)

    return {
        "deletion_auc": auc(curves[0]), "insertion_auc": auc(curves[1]),
        "deletion_curve": curves[0], "insertion_curve": curves[1], "fractions": fractions,
    }


def random_map(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Uniform noise in [0, 1) as float32: the floor every real map should beat.

    >>> random_map((32, 32), seed=1).shape
    (32, 32)
    """
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def faithfulness_for(model: nn.Module, tensor: torch.Tensor, maps: dict[str, np.ndarray], target: int,
                     steps: int = 16, with_random: bool = True) -> dict[str, dict[str, Any]]:
    """Deletion/insertion curves and AUCs of each (H, W) map for one image (one batched
    call of ``visattn.faithfulness.deletion_insertion``), plus a random map as the floor.

    Returns ``{method: {"deletion_auc", "insertion_auc", "deletion_curve",
    "insertion_curve", "fractions"}}`` with floats and lists.
    """
    maps = dict(maps)
    if with_random:
        maps["random"] = random_map(tuple(tensor.shape[-2:]), seed=0)
    if not maps:
        return {}
    names = list(maps)
    stacked = np.stack([np.nan_to_num(np.asarray(maps[n], dtype=np.float32)) for n in names])
    images = tensor.detach().expand(len(names), -1, -1, -1)
    r = deletion_insertion(model, images, stacked, [int(target)] * len(names), steps=steps)
    fractions = np.asarray(r["fractions"]).tolist()
    return {
        name: {"deletion_auc": float(r["deletion_auc"][i]), "insertion_auc": float(r["insertion_auc"][i]),
               "deletion_curve": np.asarray(r["deletion_curve"][i]).tolist(),
               "insertion_curve": np.asarray(r["insertion_curve"][i]).tolist(), "fractions": fractions}
        for i, name in enumerate(names)
    }


def _randomise(module: nn.Module) -> None:
    """Re-initialise every parameter under ``module``: ``reset_parameters`` where a module
    has it, else Gaussian noise with each parameter's std (0.02 when zero or undefined)."""
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None) or getattr(sub, "_reset_parameters", None)
        if callable(reset):
            reset()
            continue
        for p in sub.parameters(recurse=False):
            if p.numel() == 0:
                continue
            std = float(p.float().std()) if p.numel() > 1 else abs(float(p))
            p.normal_(0.0, std if math.isfinite(std) and std > 0 else 0.02)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if np.allclose(a, b, rtol=1e-5, atol=1e-12):
        return 1.0
    if a.min() == a.max() or b.min() == b.max():
        return 0.0  # a map that went constant kept nothing of the original
    from scipy.stats import spearmanr  # slow to import: only when needed

    rho = spearmanr(a, b).statistic
    return float(rho) if math.isfinite(rho) else 0.0


def sanity_check(model: nn.Module, image: Tensor, target: int | None,
                 method: str | Callable[[nn.Module], np.ndarray],
                 layers: list[str] | None = None, seed: int = 0) -> list[tuple[str, float]]:
    """Cascading model-parameter randomisation (Adebayo et al. 2018).

    A deep copy of ``model`` is randomised layer by layer from the output down; after each
    layer the map is recomputed and compared with the original by Spearman rank
    correlation. A faithful method's map should decorrelate (|rho| falls); one that stays
    the same does not depend on what the model learned. ``model`` is left untouched.

    Args:
        model: classifier. image: (1, 3, H, W). target: class (None: the predicted one).
        method: the name of a ``visattn.explain`` method (run on ``image`` and ``target``),
            or any ``callable(model) -> (H, W) map``.
        layers: module names to randomise (with all their submodules), in this order;
            None: every module with its own parameters, output first.
        seed: for the re-initialisation.

    Returns:
        [(layer name, rho after randomising it and every layer before it)].

    >>> [name for name, rho in sanity_check(model, image, 3, "grad_cam", layers=["head.fc", "stages.2"])]
    ['head.fc', 'stages.2']
    """
    if isinstance(method, str):
        from visattn.explain import METHODS

        explain = METHODS[method] if method in METHODS else _unknown(method)
        if target is None:
            with torch.no_grad():
                target = int(model(image.to(_device(model, image))).argmax(1)[0])

        def method(m: nn.Module, _name: str = method) -> np.ndarray:
            e = explain(m, image, target)
            if e is None:
                raise VisattnError(f"{_name} does not apply to this model (no attention site)")
            return e.map

    original = method(model)
    copy_ = copy.deepcopy(model)
    if layers is None:
        layers = [n for n, m in copy_.named_modules() if n and any(True for _ in m.parameters(recurse=False))][::-1]
    out = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name in layers:
            _randomise(copy_.get_submodule(name))
            with torch.enable_grad():
                out.append((name, _spearman(original, method(copy_))))
    return out


def sanity_flag(correlations: list[tuple[str, float]], threshold: float = 0.5) -> bool:
    """True when the map barely changed after randomisation (final |rho| > threshold):
    the method is suspicious, it does not reflect the model's weights.

    >>> sanity_flag([("head", 0.99), ("stages.2", 0.97)])
    True
    """
    return bool(correlations) and abs(correlations[-1][1]) > threshold


def evaluate_methods(model: nn.Module, images: Tensor, targets: Tensor | list[int] | None = None,
                     methods: tuple[str, ...] | None = None, steps: int = 16,
                     baselines: tuple[str, ...] = ("blur",), protocols: tuple[str, ...] = ("deletion_insertion",),
                     fill: Tensor | list[float] | float = 0.0) -> dict[str, dict[str, Any]]:
    """Mean deletion/insertion AUC (and other protocols' scores) and map time per method
    over a batch of images.

    Methods that do not apply to the model (attention maps without attention) are left
    out; "attention" is scored per layer ("attention (name)") when there are several.
    Each map is computed once and scored under every baseline in ``baselines``
    ("blur", "mean"); the top-level AUCs are the first baseline's. The same maps go to the
    other ``protocols`` (definitions in :mod:`visattn.perturbation`): "road" adds
    ``road_morf``, ``road_lerf``, ``road_combined``; "perturbation" adds ``positive_auc``
    and ``negative_auc`` (accuracy against ``targets``, pixels set to ``fill``). An LRP
    method (its explanation has a conservation figure) adds ``conservation``, the mean
    over the images of |Σ input relevance − logit| / |logit|.

    Args:
        model: classifier. images: (B, 3, H, W). targets: (B,); None: predicted classes.
        methods: names from ``visattn.explain.METHODS`` or "random"; None: all of them and
            "random". steps: as for :func:`deletion_insertion`. protocols: any of :data:`PROTOCOLS`.
        fill: a black pixel in the model's input space (−mean/std per channel).

    >>> evaluate_methods(model, images, methods=("saliency", "random"))["random"].keys()
    dict_keys(['deletion_auc', 'insertion_auc', 'seconds_per_image', 'baselines'])
    """
    from visattn.explain import METHODS

    if not baselines:
        raise VisattnError("at least one baseline is needed")
    methods = (*METHODS, RANDOM) if methods is None else methods
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown or "deletion_insertion" not in protocols:
        raise VisattnError(f"protocols must include deletion_insertion and come from {', '.join(PROTOCOLS)}")
    if targets is None:
        with torch.no_grad():
            targets = model(images.to(_device(model, images))).argmax(1)
    targets = [int(t) for t in torch.as_tensor(targets).reshape(-1)]
    results = {}
    for name, map_of in _map_makers(model, images, methods).items():
        maps, conservation, seconds = [], [], 0.0
        for start in range(0, len(targets), MAP_BATCH):
            t0 = time.perf_counter()
            m = map_of(slice(start, start + MAP_BATCH), targets[start : start + MAP_BATCH])
            if m is None:
                break
            maps.append(m[0])
            conservation += [] if m[1] is None else [m[1]]
            seconds += time.perf_counter() - t0
        if sum(map(len, maps)) < len(targets):
            continue
        scores, stacked = {}, np.concatenate(maps)
        for b in baselines:
            r = deletion_insertion(model, images, stacked, targets, steps=steps, baseline=b)
            scores[b] = {"deletion_auc": float(r["deletion_auc"].mean()), "insertion_auc": float(r["insertion_auc"].mean())}
        results[name] = {**scores[baselines[0]], "seconds_per_image": seconds / len(targets), "baselines": scores,
                         **_other_protocols(model, images, stacked, targets, protocols, fill)}
        if conservation:  # an LRP method: mean |Σ input relevance − logit| / |logit|
            results[name]["conservation"] = float(np.concatenate(conservation).mean())
    return results


def _other_protocols(model: nn.Module, images: Tensor, maps: np.ndarray, targets: list[int],
                     protocols: tuple[str, ...], fill: Tensor | list[float] | float) -> dict[str, float]:
    from visattn.perturbation import positive_negative, road

    out: dict[str, float] = {}
    if "road" in protocols:
        r = road(model, images, maps, targets)
        out.update({k: float(r[k].mean()) for k in ("road_morf", "road_lerf", "road_combined")})
    if "perturbation" in protocols:
        r = positive_negative(model, images, maps, targets, fill=fill)
        out.update({k: float(r[k]) for k in ("positive_auc", "negative_auc")})
    return out


MapMaker = Callable[[slice, list[int]], tuple[np.ndarray, np.ndarray | None] | None]


def _map_makers(model: nn.Module, images: Tensor, methods: tuple[str, ...]) -> dict[str, MapMaker]:
    """``{label: (image slice, targets) -> ((B, H, W) maps, (B,) conservation or None), or
    None when the method does not apply}``; a method that takes an attention layer
    ("attention") becomes one entry per layer ("attention (layer)") when the model has
    more than one."""
    from visattn.explain import METHODS, attention_layers

    def of(method: Callable, **kw) -> MapMaker:
        def make(chunk: slice, targets: list[int]) -> tuple[np.ndarray, np.ndarray | None] | None:
            e = method(model, images[chunk], targets, **kw)
            return None if e is None else (e.maps, e.conservation)
        return make

    def random_maps(chunk: slice, _targets: list[int]) -> tuple[np.ndarray, None]:
        return np.stack([random_map(tuple(images.shape[-2:]), seed=i) for i in range(len(images))[chunk]]), None

    makers: dict[str, MapMaker] = {}
    for name in methods:
        if name == RANDOM:
            makers[name] = random_maps
        elif name not in METHODS:
            _unknown(name)
        elif METHODS[name].takes_layer and METHODS[name].needs_attention \
                and len(layers := attention_layers(model, images[:1])) > 1:
            makers.update({f"{name} ({layer})": of(METHODS[name], layer=layer) for layer in layers})
        else:
            makers[name] = of(METHODS[name])
    return makers


def _unknown(name: str):
    from visattn.explain import METHODS

    raise VisattnError(f"unknown method {name!r}; known: {', '.join((*METHODS, RANDOM))}")


_EXTRA_COLUMNS = {"road_morf": "ROAD MoRF ↓", "road_lerf": "ROAD LeRF ↑", "road_combined": "ROAD combined ↑",
                  "positive_auc": "positive AUC ↓", "negative_auc": "negative AUC ↑"}


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """The results of :func:`evaluate_methods` as a Markdown table, best insertion first;
    one deletion and one insertion column per baseline; a conservation column (—: not an
    LRP method) when an LRP method is in it.

    >>> print(markdown_table({"saliency": {"deletion_auc": 0.1, "insertion_auc": 0.6, "seconds_per_image": 0.01}}))
    | method | deletion AUC ↓ | insertion AUC ↑ | s / image |
    |---|---:|---:|---:|
    | saliency | 0.100 | 0.600 | 0.010 |
    """
    first = next(iter(results.values()), {})
    names = list(first.get("baselines", {})) if len(first.get("baselines", {})) > 1 else []
    head = [f"deletion AUC ↓ ({b})" for b in names] + [f"insertion AUC ↑ ({b})" for b in names] if names else \
        ["deletion AUC ↓", "insertion AUC ↑"]
    extra = [k for k in _EXTRA_COLUMNS if k in first]
    extra += ["conservation"] if any("conservation" in r for r in results.values()) else []
    head += [_EXTRA_COLUMNS.get(k, "|ΣR − logit| / |logit|") for k in extra]
    lines = ["| method | " + " | ".join(head) + " | s / image |", "|---|" + "---:|" * (len(head) + 1)]
    for name, r in sorted(results.items(), key=lambda kv: -kv[1]["insertion_auc"]):
        cells = ([r["baselines"][b]["deletion_auc"] for b in names] + [r["baselines"][b]["insertion_auc"] for b in names]
                 if names else [r["deletion_auc"], r["insertion_auc"]])
        cells += [r.get(k) for k in extra]
        lines.append(f"| {name} | " + " | ".join("—" if c is None else f"{c:.3f}" for c in cells)
                     + f" | {r['seconds_per_image']:.3f} |")
    return "\n".join(lines)
