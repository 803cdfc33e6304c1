"""The ``visattn`` command line: train, eval, predict, explain, ablate, faithfulness, atlas, export, models."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from visattn import paths
from visattn.errors import VisattnError


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["heads=8", "widths=(32,64,128)", "similarity=cosine"]`` -> a config dict."""
    from visattn.sources import parse_options

    return parse_options(items)


def open_source(a: argparse.Namespace):
    """The model and metadata of the command's SOURCE (see :func:`visattn.sources.load_model`;
    ``torchvision:ARCH:WEIGHTS`` names torchvision weights, see :func:`visattn.zoo.load_model`)."""
    from visattn.sources import load_model
    from visattn.zoo import load_model as zoo_model

    if a.source.startswith("torchvision:") and a.source.count(":") == 2:
        return zoo_model(a.source)
    return load_model(a.source, weights=a.weights, labels=a.labels, pretrained=a.pretrained,
                      options=parse_overrides(a.set))


def add_source(p: argparse.ArgumentParser) -> None:
    """SOURCE and how to open it, the same for every command that runs a model."""
    p.add_argument("source", metavar="SOURCE",
                   help="a visattn checkpoint, a Hugging Face folder (config.json + model.safetensors), "
                        "timm:ARCH, torchvision:ARCH[:WEIGHTS] or hf:OWNER/NAME (from the hub cache; downloads only "
                        "when missing)")
    p.add_argument("--weights", metavar="FILE.safetensors", help="state dict for timm:/torchvision: (strict)")
    p.add_argument("--pretrained", action="store_true", help="timm:/torchvision: with the library's own "
                                                             "pretrained weights (downloads unless cached)")
    p.add_argument("--labels", metavar="FILE", help="class names: one per line, or JSON (list or {index: name})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture argument for timm:/torchvision:, e.g. num_classes=10, repeatable")


def cmd_train(a: argparse.Namespace) -> int:
    from visattn.train import TrainConfig, train

    overrides = parse_overrides(a.set)
    fields = TrainConfig.__dataclass_fields__
    train_kw = {k: v for k, v in vars(a).items() if k in fields and v is not None}
    _, meta = train(TrainConfig(model_config=overrides, **train_kw), resume=a.resume)
    if meta:
        print(f"saved {a.out}: test accuracy {meta['accuracy']:.4f} after {meta['epochs']} epochs")
    return 0


def reproduce_command(meta: dict[str, Any]) -> str:
    """The ``visattn train`` command that made a checkpoint, from its saved training config."""
    from visattn.train import TrainConfig

    cfg = meta.get("train_config") or {}
    defaults = TrainConfig()
    recipe = ("init", "optimizer", "lr", "weight_decay", "attn_lr_scale", "batch_size", "label_smoothing", "cutout",
              "lookahead", "seed")
    parts = [f"visattn train --model {meta['model']}"]
    parts += [f"--set \"{k}={tuple(v) if isinstance(v, list) else v}\"" for k, v in cfg.get("model_config", {}).items()]
    parts += [f"--{k.replace('_', '-')} {cfg[k]}" for k in recipe
              if k in cfg and cfg[k] is not None and cfg[k] != getattr(defaults, k)]
    parts += [f"--epochs {cfg.get('epochs')}", f"--out {cfg.get('out')}"]
    return " ".join(parts)


def _number(value: Any, fmt: str) -> str:
    """``value`` formatted, or "n/a" when a checkpoint does not record it.

    >>> _number(0.9003, ".2%"), _number(None, ".2%")
    ('90.03%', 'n/a')
    """
    return format(value, fmt) if isinstance(value, (int, float)) else "n/a"


def cmd_models(a: argparse.Namespace) -> int:
    from visattn.models import list_models
    from visattn.zoo import shipped_checkpoints

    folder = paths.checkpoints()
    rows = []
    for name, meta in shipped_checkpoints(folder).items():
        path = Path(meta["path"])
        rows.append({"checkpoint": f"{folder.name}/{name}", "model": meta.get("model"),
                     "accuracy": meta.get("accuracy"), "params": meta.get("params"), "epochs": meta.get("epochs"),
                     "train_seconds": meta.get("train_seconds"), "hardware": meta.get("hardware"),
                     "size_mb": path.stat().st_size / 2**20, "command": reproduce_command(meta)})
    if a.markdown:
        print("| checkpoint | model | top-1 (CIFAR-10 test, 10,000) | params | epochs | training time | hardware | size |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| `{r['checkpoint']}` | {r['model']} | {_number(r['accuracy'], '.2%')} | {_number(r['params'], ',')} "
                  f"| {r['epochs']} | {(r['train_seconds'] or 0) / 60:.0f} min | {r['hardware']} | {r['size_mb']:.1f} MB |")
        print()
        for r in rows:
            print(f"- `{r['checkpoint']}`: `{r['command']}`")
        return 0
    if a.json:
        print(json.dumps({"registry": list_models(), "checkpoints": rows}, indent=2))
        return 0
    print("registered models:", ", ".join(list_models()))
    for r in rows:
        print(f"  {r['checkpoint']}: {r['model']}, {_number(r['accuracy'], '.2%')} top-1, "
              f"{_number(r['params'], ',')} params, {r['epochs']} epochs")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from visattn.data import load_split
    from visattn.train import confusion_matrix, per_class_accuracy, predict_logits

    model, meta = open_source(a)
    split = load_split(a.data, "test", cache=a.cache)
    if a.n:
        split = split.subset(a.n)
    pred = predict_logits(model, split.images, meta["mean"], meta["std"], tta=a.tta).argmax(1)
    confusion = confusion_matrix(split.labels, pred, len(split.classes))
    per_class = per_class_accuracy(confusion).tolist()
    result = {"source": str(a.source), "images": len(split), "accuracy": (pred == split.labels).float().mean().item(),
              "per_class": dict(zip(split.classes, per_class)), "confusion": confusion.tolist(), "tta": a.tta}
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{a.source}: top-1 {result['accuracy']:.2%} on {len(split)} test images")
        for c, acc in result["per_class"].items():
            print(f"  {c:12s} {acc:.2%}")
        print("confusion (rows: true, columns: predicted):")
        for c, row in zip(split.classes, confusion.tolist()):
            print(f"  {c[:10]:10s} " + " ".join(f"{v:4d}" for v in row))
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from visattn.inference import predict_image

    model, meta = open_source(a)
    failed, results = 0, []
    for path in a.images:
        try:
            top = predict_image(model, meta, Path(path).read_bytes() if Path(path).is_file() else path, k=a.k)
        except (VisattnError, OSError) as e:
            print(f"{path}: {e}".splitlines()[0], file=sys.stderr)
            failed += 1
            continue
        results.append({"image": path, "top": top})
        if not a.json:
            print(f"{path}: " + ", ".join(f"{c} {p:.1%}" for c, p in top))
    if a.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


def cmd_explain(a: argparse.Namespace) -> int:
    from visattn.inference import write_explanation

    model, meta = open_source(a)
    written, notes = write_explanation(model, meta, a.image, Path(a.out), a.methods)
    for f in written:
        print(f)
    for note in notes:
        print(note, file=sys.stderr)
    return 0


def parse_heads(text: str) -> list[int]:
    """``"0,2"`` -> ``[0, 2]``.

    >>> parse_heads("0, 2")
    [0, 2]
    """
    try:
        heads = [int(h) for h in text.split(",") if h.strip()]
    except ValueError:
        raise VisattnError(f"--heads expects comma-separated head numbers like 0,2; got {text!r}") from None
    if not heads:
        raise VisattnError("--heads names no head")
    return heads


def cmd_ablate(a: argparse.Namespace) -> int:
    import torch

    from visattn.ablation import ablate
    from visattn.inference import prepare

    model, meta = open_source(a)
    heads = parse_heads(a.heads)
    _, x = prepare(Path(a.image).read_bytes(), meta)
    reference = torch.cat([prepare(Path(p).read_bytes(), meta)[1] for p in a.reference]) if a.reference else None
    with torch.no_grad():
        before = model(x)[0]
    after = ablate(model, x, {a.layer: heads}, mode=a.mode, reference=reference)[0]
    classes = list(meta["classes"])

    def summary(logits: torch.Tensor) -> dict[str, Any]:
        probs = logits.float().softmax(-1)
        top = probs.topk(min(a.k, len(classes))).indices.tolist()
        return {"top": [[classes[i], float(probs[i])] for i in top],
                "logits": dict(zip(classes, map(float, logits)))}

    result = {"image": a.image, "layer": a.layer, "heads": heads, "mode": a.mode,
              "before": summary(before), "after": summary(after)}
    if a.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{a.image}: {a.layer} heads {','.join(map(str, heads))} ablated ({a.mode})")
    for label in ("before", "after"):
        r = result[label]
        print(f"  {label:6s} " + ", ".join(f"{c} {p:.1%} (logit {r['logits'][c]:+.2f})" for c, p in r["top"]))
    return 0


def cmd_faithfulness(a: argparse.Namespace) -> int:
    from visattn.data import load_split, normalise
    from visattn.faithfulness import evaluate_methods, markdown_table

    model, meta = open_source(a)
    split = load_split(a.data, "test", cache=a.cache).subset(a.n)
    images = normalise(split.images, meta["mean"], meta["std"])
    methods = tuple(a.methods) if a.methods else None  # None: every method and the random floor
    black = [-m / s for m, s in zip(meta["mean"], meta["std"])]
    results = evaluate_methods(model, images, split.labels, methods=methods, steps=a.steps,
                               baselines=tuple(a.baselines), protocols=("deletion_insertion", *a.protocols), fill=black)
    print(json.dumps(results, indent=2) if a.json else markdown_table(results))
    return 0


def cmd_atlas(a: argparse.Namespace) -> int:
    from visattn.atlas import build_atlas
    from visattn.atlas_view import atlas_html, atlas_png, describe, summary_json
    from visattn.checkpoint import atomic_write
    from visattn.data import load_split
    from visattn.train import dist_info
    from visattn.zoo import load_model

    out = Path(a.out) if a.out else None
    if out is not None and out.suffix.lower() not in (".html", ".png"):
        raise VisattnError(f"--out must end in .html or .png, not {out.name!r}")
    model, meta = load_model(a.source)
    split = load_split(a.data, "test", cache=a.cache)
    atlas = build_atlas(model, meta, split, n=a.n, seed=a.seed, max_tokens=a.max_tokens, method=a.method,
                        layer=a.layer, head=a.head, cache=a.cache, refresh=a.refresh)
    if dist_info()[0] != 0:
        return 0  # under torchrun the first process reports
    if out is not None:
        if out.suffix.lower() == ".png":
            data = atlas_png(atlas, colour_by=a.colour)
        else:
            data = atlas_html(atlas, colour_by=a.colour).encode()
        atomic_write(out, data)
    if a.json:
        print(json.dumps(summary_json(atlas), indent=2))
        return 0
    print(describe(atlas))
    for row in atlas.summary():
        print(f"  {row['layer']} head {row['head']}: corr {row['corr']:+.3f} (2D), {row['corr_full']:+.3f} "
              f"(before embedding), {row['points']:,} points")
    if out is not None:
        print(f"wrote {out}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from visattn.checkpoint import atomic_write
    from visattn.export import session_html
    from visattn.zoo import load_model

    model, meta = load_model(a.source)
    page = session_html(model, meta, Path(a.image).read_bytes(), name=Path(a.image).name,
                        layers=[a.layer] if a.layer else None, methods=tuple(a.methods) if a.methods is not None else None)
    atomic_write(a.out, page.encode())
    print(f"wrote {a.out} ({len(page.encode()) / 2**20:.2f} MB): opens offline in any browser")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visattn", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (see visattn/train.py for examples)")
    t.add_argument("--model", default="sa_cnn")
    t.add_argument("--data", default=None, help="folder with train/ and test/, or 'cifar10' to download")
    t.add_argument("--out", required=True)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config override, repeatable")
    t.add_argument("--resume", action="store_true", help="continue from OUT's .state.safetensors")
    for name, typ in [("optimizer", str), ("epochs", int), ("batch-size", int), ("lr", float), ("weight-decay", float),
                      ("attn-lr-scale", float), ("label-smoothing", float), ("cutout", int), ("lookahead", float),
                      ("init", str), ("subset", int), ("eval-subset", int), ("seed", int), ("cache", str),
                      ("stop-after", int), ("probe", str)]:
        t.add_argument(f"--{name}", type=typ)
    t.add_argument("--compile", action="store_true", default=None)
    t.add_argument("--no-amp", dest="amp", action="store_false", default=None,
                   help="train in float32 (default: bf16 autocast on CUDA and on CPUs with native bf16)")
    t.set_defaults(func=cmd_train)

    m = sub.add_parser("models", help="the registry and the shipped checkpoints")
    m.add_argument("--json", action="store_true")
    m.add_argument("--markdown", action="store_true", help="the README's table of shipped checkpoints")
    m.set_defaults(func=cmd_models)

    e = sub.add_parser("eval", help="top-1, per-class accuracy and confusion matrix on the test split")
    add_source(e)
    e.add_argument("--data", default=None)
    e.add_argument("--n", type=int, default=0, help="evaluate on a fixed sample of N test images")
    e.add_argument("--tta", nargs="?", const="flip", choices=["flip", "translate"],
                   help="average with the mirror images (--tta or --tta flip), and with one-pixel shifts (--tta translate)")
    e.add_argument("--cache")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="top-k classes for each image")
    add_source(pr)
    pr.add_argument("images", nargs="+")
    pr.add_argument("-k", type=int, default=5)
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_predict)

    x = sub.add_parser("explain", help="PNG overlays of every layer and head and of every explanation method, "
                                       "and an .npz of raw maps")
    add_source(x)
    x.add_argument("image")
    x.add_argument("--out", required=True)
    x.add_argument("--methods", nargs="*", metavar="METHOD",
                   help="explanation methods to draw (default: every one of visattn.explain.METHODS; "
                        "none: only the attention layers and heads)")
    x.set_defaults(func=cmd_explain)

    ab = sub.add_parser("ablate", help="logits and top-k before and after silencing attention heads")
    add_source(ab)
    ab.add_argument("image")
    ab.add_argument("--layer", required=True, help="an attention layer's name, e.g. stages.1.1 or blocks.0.attn")
    ab.add_argument("--heads", required=True, help="comma-separated head numbers, e.g. 0,2")
    ab.add_argument("--mode", choices=("zero", "mean"), default="zero",
                    help="heads' outputs set to zero, or to their mean over --reference images")
    ab.add_argument("--reference", nargs="+", default=[], metavar="IMAGE", help="images for --mode mean (2 or more)")
    ab.add_argument("-k", type=int, default=5)
    ab.add_argument("--json", action="store_true")
    ab.set_defaults(func=cmd_ablate)

    f = sub.add_parser("faithfulness", help="deletion/insertion AUC per explanation method")
    add_source(f)
    f.add_argument("--data", default=None)
    f.add_argument("--n", type=int, default=500)
    f.add_argument("--steps", type=int, default=16)
    f.add_argument("--baselines", nargs="+", choices=("blur", "mean"), default=["blur", "mean"],
                   help="what removed pixels become: a strong blur, or the image's mean colour (each map scored "
                        "under each)")
    f.add_argument("--protocols", nargs="*", choices=("road", "perturbation"), default=["road", "perturbation"],
                   help="beside deletion/insertion: ROAD (noisy linear imputation, MoRF/LeRF) and Chefer et al.'s "
                        "positive/negative perturbation; definitions in visattn/perturbation.py")
    f.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="explanation methods to score (default: all), e.g. rollout gae transformer_attribution random")
    f.add_argument("--cache")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_faithfulness)

    at = sub.add_parser("atlas", help="queries and keys of many images embedded together, per head (AttentionViz)")
    at.add_argument("source", help="checkpoint, Hugging Face folder, timm:ARCH, hf:OWNER/NAME, torchvision:ARCH "
                                   "or torchvision:ARCH:WEIGHTS (a torchvision weights name, or none)")
    at.add_argument("--data", default=None, help="folder with test/ (ImageFolder layout); default visattn.paths.data()")
    at.add_argument("--n", "--images", dest="n", type=int, default=1000,
                    help="images, a fixed random sample of the test split (--images under torchrun, whose own "
                         "options --nnodes, --nproc-per-node... make --n ambiguous)")
    at.add_argument("--layer", help="one attention layer (default: all)")
    at.add_argument("--head", type=int, help="one head of --layer (default: all)")
    at.add_argument("--max-tokens", type=int, default=4096,
                    help="tokens sampled per layer when images x tokens is more (each: one query, one key point)")
    at.add_argument("--method", choices=("umap", "pca"), default="umap")
    at.add_argument("--colour", choices=("kind", "row", "column", "class", "norm"), default="kind")
    at.add_argument("--seed", type=int, default=0)
    at.add_argument("--out", help="atlas.html (interactive, self-contained) or atlas.png")
    at.add_argument("--refresh", action="store_true", help="recompute even when cached")
    at.add_argument("--cache")
    at.add_argument("--json", action="store_true", help="per head: corr, corr_full, points; sampling and timings")
    at.set_defaults(func=cmd_atlas)

    ex = sub.add_parser("export", help="one self-contained HTML file of an Explore session (offline, no server)")
    ex.add_argument("source", help="checkpoint, Hugging Face folder, timm:ARCH, hf:OWNER/NAME, torchvision:ARCH "
                                   "or torchvision:ARCH:WEIGHTS (a torchvision weights name, or none)")
    ex.add_argument("image")
    ex.add_argument("--out", required=True, help="session.html")
    ex.add_argument("--layer", help="one attention layer only (default: all)")
    ex.add_argument("--methods", nargs="*", metavar="METHOD",
                    help="explanation methods scored for faithfulness (default: all; none: just the random floor)")
    ex.set_defaults(func=cmd_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VisattnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable output, full disk, missing file: one line, not a traceback
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
