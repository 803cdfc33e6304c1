"""What each attention head does for the prediction: head ablation, head importance and
activation patching.

Every function here edits head outputs (``weights @ V``, (B, heads, N, d_v), before the
layer's output projection) through :func:`visattn.tracing.editing`: the edit lives in a
per-thread ``ContextVar``, so threads sharing one cached model never see each other's
ablations, and nothing (no hook, no flag, no parameter) is left on the model. Models run in
whatever train/eval mode the caller left them in; use eval mode (batch norm in train mode
mixes the images of a batch).

A head is named by its attention layer (a module name, as in ``capture(model, x).attention``)
and its index.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from visattn.tracing import editing
from visattn.errors import VisattnError

MODES = ("zero", "mean")

#: ``{layer name: [head, ...]}``
HeadSpec = Mapping[str, Sequence[int]]


class AblationError(VisattnError, ValueError):
    """An ablation that cannot be run: unknown layer or head, bad mode, no reference."""


def _prepared(model: nn.Module) -> dict[int, str]:
    """Module names by id (timm, Hugging Face and ``nn.MultiheadAttention`` layers reach the
    edit through :func:`visattn.intercept.watching`; nothing is changed on the model)."""
    return {id(m): n for n, m in model.named_modules()}


@contextlib.contextmanager
def _edited_layers(names: dict[int, str], edits: Mapping[str, Callable[[Tensor], Tensor]]) -> Iterator[None]:
    """Inside the block, ``edits[layer](out) -> out`` is applied to the head outputs of the
    named layers (this thread only); an edited layer the block's forwards never reached is an
    error at its end."""
    seen: list[str] = []

    def edit(module: nn.Module, out: Tensor) -> Tensor:
        name = names.get(id(module), f"{type(module).__name__}@{id(module):x}")
        seen.append(name)
        return edits[name](out) if name in edits else out

    with editing(edit):
        yield
    _check_layers(edits, seen)


def _run(model: nn.Module, images: Tensor, names: dict[int, str],
         edits: Mapping[str, Callable[[Tensor], Tensor]]) -> Tensor:
    """Logits of ``model(images)`` with :func:`_edited_layers`' ``edits``."""
    with _edited_layers(names, edits), torch.no_grad():
        return model(images)


def _check_layers(wanted: Iterable[str], seen: Sequence[str]) -> None:
    missing = [name for name in wanted if name not in seen]
    if missing:
        raise AblationError(f"no attention layer {missing[0]!r}; this model has {', '.join(seen) or 'none'}")


def head_outputs(model: nn.Module, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """One plain forward: ``(logits, {layer: head outputs (B, heads, N, d_v)})`` for every
    attention layer, in forward order.

    >>> from visattn import create_model
    >>> logits, outs = head_outputs(create_model("hybrid_vit", depth=2).eval(), torch.rand(1, 3, 32, 32))
    >>> {name: tuple(o.shape) for name, o in outs.items()}
    {'blocks.0.attn': (1, 4, 64, 32), 'blocks.1.attn': (1, 4, 64, 32)}
    """
    names, outs = _prepared(model), {}

    def edit(module: nn.Module, out: Tensor) -> Tensor:
        outs[names.get(id(module), f"{type(module).__name__}@{id(module):x}")] = out.detach()
        return out

    with editing(edit), torch.no_grad():
        logits = model(images)
    return logits, outs


def _head_mask(heads: Sequence[int], count: int, layer: str) -> Tensor:
    bad = [h for h in heads if not 0 <= int(h) < count]
    if bad:
        raise AblationError(f"{layer} has heads 0..{count - 1}; no head {bad[0]}")
    mask = torch.zeros(count, dtype=torch.bool)
    mask[list(map(int, heads))] = True
    return mask


def _replacements(model: nn.Module, images: Tensor, layers: Sequence[str], mode: str,
                  reference: Tensor | None, outs: dict[str, Tensor] | None = None) -> dict[str, Tensor | None]:
    """What ablated heads become, per layer: ``None`` (zeros) or the head outputs' mean over
    the reference images (heads, N, d_v), position by position (``outs``: the head outputs
    of ``images``, when already computed)."""
    if mode not in MODES:
        raise AblationError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "zero":
        return dict.fromkeys(layers)
    reference = images if reference is None else reference
    if reference.shape[0] < 2:
        raise AblationError("mean ablation needs a reference set of at least 2 images "
                            "(the mean over one image is that image)")
    if reference is not images or outs is None:
        _, outs = head_outputs(model, reference)
    _check_layers(layers, list(outs))
    return {name: outs[name].float().mean(0) for name in layers}


def _replace(out: Tensor, mask: Tensor, source: Tensor | None) -> Tensor:
    """``out`` with the heads in ``mask`` (broadcast against it) taken from ``source`` (zeros if None)."""
    mask = mask.to(out.device)
    if source is None:
        return out.masked_fill(mask, 0.0)
    return torch.where(mask, source.to(out), out)


def ablate(model: nn.Module, images: Tensor, heads: HeadSpec, mode: str = "zero",
           reference: Tensor | None = None) -> Tensor:
    """Logits of ``model(images)`` with the given heads' outputs replaced.

    Args:
        model: a classifier whose attention goes through ``visattn.sites.attend``.
        images: (B, 3, H, W), normalised as the model expects.
        heads: ``{layer name: [head, ...]}``; an empty mapping gives the plain logits.
        mode: "zero" (outputs set to 0) or "mean" (set to their mean over ``reference``,
            per head, token position and channel).
        reference: (R, 3, H, W) images for "mean"; None: ``images`` themselves (R >= 2).

    >>> from visattn import create_model
    >>> model, x = create_model("hybrid_vit", depth=2).eval(), torch.rand(1, 3, 32, 32)
    >>> ablate(model, x, {"blocks.1.attn": [0, 2]}).shape
    torch.Size([1, 10])
    >>> torch.equal(ablate(model, x, {}), model(x))
    True
    """
    with ablating(model, heads, mode, reference if reference is not None else images), torch.no_grad():
        return model(images)


@contextlib.contextmanager
def ablating(model: nn.Module, heads: HeadSpec, mode: str = "zero", reference: Tensor | None = None) -> Iterator[None]:
    """Inside the block, every forward of ``model`` in this thread runs with the given heads'
    outputs replaced, as in :func:`ablate` (``reference``: the images of "mean"); an ablated
    layer that no forward reached is an AblationError at the end of the block.

    >>> from visattn import create_model
    >>> model = create_model("hybrid_vit", depth=2).eval()
    >>> with ablating(model, {"blocks.0.attn": [1]}), torch.no_grad():
    ...     logits = model(torch.rand(1, 3, 32, 32))
    """
    if mode == "mean" and reference is None:
        raise AblationError("mean ablation needs a reference set of images")
    sources = _replacements(model, reference, list(heads), mode, reference)

    def edit_for(layer: str) -> Callable[[Tensor], Tensor]:
        def edit(out: Tensor) -> Tensor:
            mask = _head_mask(heads[layer], out.shape[1], layer)[None, :, None, None]  # (1, h, 1, 1)
            return _replace(out, mask, sources[layer])
        return edit

    with _edited_layers(_prepared(model), {layer: edit_for(layer) for layer in heads}):
        yield


def _sweep(model: nn.Module, images: Tensor, names: dict[int, str], layer: str, count: int,
           source: Tensor | None) -> Tensor:
    """One forward over ``count`` copies of ``images``: in copy j head j of ``layer`` is
    replaced by ``source`` (broadcast to (B, h, N, d_v); None: zeros). Returns (count, B, K)."""
    b = images.shape[0]
    mask = torch.eye(count, dtype=torch.bool)[:, None, :, None, None]  # (copy, 1, head, 1, 1)

    def edit(out: Tensor) -> Tensor:
        return _replace(out.unflatten(0, (count, b)), mask, source).flatten(0, 1)

    logits = _run(model, images.repeat(count, 1, 1, 1), names, {layer: edit})
    return logits.unflatten(0, (count, b))


@dataclass
class HeadEffects:
    """Per-head effects on a batch: arrays (B, layers, max heads), NaN where a layer has fewer heads."""

    layers: list[str]
    heads: list[int]  # heads per layer
    targets: list[int]  # the class tracked for each image
    logit: np.ndarray  # head importance: change of the target logit; patching: fraction restored
    prob: np.ndarray | None  # head importance: change of the target probability


def _table(per_layer: list[Tensor], heads: list[int]) -> np.ndarray:
    """[(heads_l, B)] -> (B, layers, max heads), NaN-padded."""
    b = per_layer[0].shape[1]
    out = np.full((b, len(per_layer), max(heads)), np.nan, dtype=np.float32)
    for i, t in enumerate(per_layer):
        out[:, i, : t.shape[0]] = t.T.float().cpu().numpy()
    return out


def head_importance(model: nn.Module, images: Tensor, targets: Sequence[int] | Tensor | None = None,
                    mode: str = "zero", reference: Tensor | None = None) -> HeadEffects:
    """Change of the target class's logit and probability when each head of each layer is
    ablated alone (negative: the head was helping). One plain forward, then one forward per
    attention layer over the batch repeated once per head.

    Args:
        model, images, mode, reference: as for :func:`ablate`.
        targets: (B,) classes; None: each image's predicted class.

    >>> from visattn import create_model
    >>> fx = head_importance(create_model("hybrid_vit", depth=2).eval(), torch.rand(1, 3, 32, 32))
    >>> fx.layers, fx.logit.shape
    (['blocks.0.attn', 'blocks.1.attn'], (1, 2, 4))
    """
    logits, outs = head_outputs(model, images)
    if not outs:
        raise AblationError(f"{type(model).__name__} has no attention heads to ablate")
    names = _prepared(model)
    t = logits.argmax(1) if targets is None else torch.as_tensor(targets, device=logits.device).long().reshape(-1)
    sources = _replacements(model, images, list(outs), mode, reference, outs)
    heads = [o.shape[1] for o in outs.values()]
    base_logit = logits.gather(1, t[:, None])[:, 0]
    base_prob = logits.float().softmax(1).gather(1, t[:, None])[:, 0]
    d_logit, d_prob = [], []
    for (layer, count) in zip(outs, heads):
        swept = _sweep(model, images, names, layer, count, sources[layer])  # (h, B, K)
        index = t[None, :, None].expand(count, -1, 1)
        d_logit.append(swept.gather(2, index)[..., 0] - base_logit)
        d_prob.append(swept.float().softmax(2).gather(2, index)[..., 0] - base_prob)
    return HeadEffects(list(outs), heads, t.tolist(), _table(d_logit, heads), _table(d_prob, heads))


def patch(model: nn.Module, corrupted: Tensor, clean: Tensor, heads: HeadSpec) -> Tensor:
    """Logits of ``model(corrupted)`` with the given heads' outputs taken from the run on
    ``clean`` (same batch size, or one clean image for all).

    >>> from visattn import create_model
    >>> model, a, b = create_model("hybrid_vit", depth=2).eval(), torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    >>> patch(model, b, a, {"blocks.1.attn": [0, 3]}).shape
    torch.Size([1, 10])
    """
    names = _prepared(model)
    _, outs = head_outputs(model, clean)
    _check_layers(heads, list(outs))

    def edit_for(layer: str) -> Callable[[Tensor], Tensor]:
        def edit(out: Tensor) -> Tensor:
            mask = _head_mask(heads[layer], out.shape[1], layer)[None, :, None, None]
            return _replace(out, mask, outs[layer])
        return edit

    return _run(model, corrupted, names, {layer: edit_for(layer) for layer in heads})


def logit_difference(logits: Tensor, clean_class: Tensor, corrupted_class: Tensor) -> Tensor:
    """logit[clean class] − logit[corrupted class] per image (B,); the clean-class logit alone
    where both runs predict the same class."""
    diff = logits.gather(-1, clean_class[..., None])[..., 0] - logits.gather(-1, corrupted_class[..., None])[..., 0]
    return torch.where(clean_class == corrupted_class, logits.gather(-1, clean_class[..., None])[..., 0], diff)


def patching_effects(model: nn.Module, clean: Tensor, corrupted: Tensor) -> HeadEffects:
    """Fraction of the logit difference each head restores when its output from the clean
    run is put into the corrupted run, alone: (LD(patched) − LD(corrupted)) / (LD(clean) −
    LD(corrupted)), with LD from :func:`logit_difference` (1: the head alone restores the
    clean prediction's margin; 0: no effect; NaN where clean and corrupted have the same
    LD). One forward per image set, then one per attention layer.

    Args:
        model: classifier. clean, corrupted: (B, 3, H, W) pairs, image i with image i.

    >>> from visattn import create_model
    >>> model = create_model("hybrid_vit", depth=2).eval()
    >>> patching_effects(model, torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)).logit.shape
    (1, 2, 4)
    """
    if clean.shape != corrupted.shape:
        raise AblationError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} differ in shape")
    clean_logits, outs = head_outputs(model, clean)
    if not outs:
        raise AblationError(f"{type(model).__name__} has no attention heads to patch")
    corrupted_logits, _ = head_outputs(model, corrupted)
    names = _prepared(model)
    c, c2 = clean_logits.argmax(1), corrupted_logits.argmax(1)
    ld_clean, ld_corrupt = logit_difference(clean_logits, c, c2), logit_difference(corrupted_logits, c, c2)
    span = ld_clean - ld_corrupt
    span = torch.where(span.abs() > 1e-6, span, torch.full_like(span, float("nan")))
    heads = [o.shape[1] for o in outs.values()]
    restored = []
    for layer, count in zip(outs, heads):
        swept = _sweep(model, corrupted, names, layer, count, outs[layer])  # (h, B, K)
        ld = logit_difference(swept, c.expand(count, -1), c2.expand(count, -1))
        restored.append((ld - ld_corrupt) / span)
    return HeadEffects(list(outs), heads, c.tolist(), _table(restored, heads), None)
