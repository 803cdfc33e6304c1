"""Training: a fast CIFAR-style recipe for the registered models.

Examples:
    visattn train --model sa_cnn --data ../shared/datasets/cifar10 --epochs 10 \
        --out checkpoints/sa_cnn.safetensors
    visattn train --model sa_cnn --set heads=8 --set similarity=cosine --epochs 2 --out runs/x.safetensors
    visattn train ... --resume            # continue after a kill, from the last epoch saved
    torchrun --nproc_per_node 2 -m visattn train ...   # DistributedDataParallel

Each run writes, beside ``--out``: ``NAME.metrics.jsonl`` (one JSON line every few seconds
and per epoch, with the probe: see :mod:`visattn.probe`), ``NAME.status.json`` (phase,
progress, time left: see :mod:`visattn.progress`), ``NAME.state.safetensors`` (weights,
optimiser, epoch: for --resume) and, while it runs, ``NAME.safetensors.lock``.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load as st_load
from torch import Tensor, nn
from tqdm.auto import tqdm

from visattn.checkpoint import atomic_write, load_checkpoint, read_header, save_checkpoint, tensors_to_bytes
from visattn.data import CIFAR10_MEAN, CIFAR10_STD, Split, augment, load_split, normalise
from visattn.errors import TrainingError
from visattn.image_io import image_to_uint8_array, load_image
from visattn.models import create_model
from visattn.probe import probe
from visattn.progress import StatusFile


# ----------------------------------------------------------------------------- hyper-parameters
@dataclass
class TrainConfig:
    model: str = "sa_cnn"
    model_config: dict[str, Any] = field(default_factory=dict)
    data: str | None = None  # None: visattn.paths.data()
    out: str = "checkpoints/model.safetensors"
    epochs: int = 10
    batch_size: int = 512
    optimizer: str = "sgd"  # "sgd" (Nesterov; CNNs) or "adamw" (transformers)
    lr: float = 0.4  # peak learning rate (mean loss); about 2e-3 suits adamw
    momentum: float = 0.9  # SGD's Nesterov momentum
    weight_decay: float = 5e-4  # on conv and linear weights only; about 0.05 suits adamw
    attn_lr_scale: float = 1.0  # learning-rate multiplier of attention's shape: temperatures and position tables
    label_smoothing: float = 0.2
    warmup: float = 0.15  # fraction of the steps spent rising to the peak; then linear decay to 0
    pad: int = 2  # random-translation pixels
    cutout: int = 0  # cutout square side (0: off)
    lookahead: float = 0.0  # airbench's lookahead (0: off): every 5 steps the weights move onto an average
    # of themselves that forgets at rate lookahead**5 * (step / total)**3; the last step takes the average
    subset: int = 0  # train on this many images only (0: all), for tests and quick looks
    eval_subset: int = 0  # evaluate on this many test images only (0: all)
    seed: int = 0
    log_every: int = 20  # at most this many steps between metric lines
    log_seconds: float = 2.0  # at most this many seconds between metric lines
    probe: str = "0"  # probe image: an index into the test split, or an image file
    probe_seconds: float = 4.0  # at least this many seconds between probes inside an epoch
    compile: bool = False  # torch.compile (CUDA)
    amp: bool = True  # bf16 autocast: on CUDA, and on CPUs with native bf16 (AVX512-BF16, AMX)
    cache: str | None = None  # decoded data-set cache folder
    stop_after: int = 0  # stop after this many epochs of this call (tests of --resume)
    init: str | None = None  # start from this checkpoint's weights (fine-tuning), not from scratch


def paths(out: str) -> dict[str, Path]:
    p = Path(out)
    stem = p.name.removesuffix(".safetensors")
    return {"out": p, "metrics": p.with_name(stem + ".metrics.jsonl"), "state": p.with_name(stem + ".state.safetensors"),
            "status": p.with_name(stem + ".status.json"), "lock": p.with_name(p.name + ".lock")}


def amp_enabled(device: torch.device, wanted: bool = True) -> bool:
    """Whether bf16 autocast speeds training up here: always on CUDA; on a CPU only with
    native bf16 instructions (elsewhere oneDNN emulates them, slower than float32)."""
    if not wanted:
        return False
    if device.type == "cuda":
        return True
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# ----------------------------------------------------------------------------- distributed
def dist_info() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


# ----------------------------------------------------------------------------- evaluation
TTA_MODES = ("", "flip", "translate")


def _flip_average(model: nn.Module, x: Tensor) -> Tensor:
    return 0.5 * (model(x).float() + model(x.flip(-1)).float())


def _views(model: nn.Module, x: Tensor, tta: str) -> Tensor:
    """Logits of one batch: plain; "flip": averaged with the mirror image; "translate": airbench's
    six views, half weight on the flip pair, a quarter on each flip pair shifted one pixel
    up-left and down-right (reflect padding)."""
    if not tta:
        return model(x).float()
    logits = _flip_average(model, x)
    if tta == "translate":
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]
        logits = 0.5 * logits + 0.25 * sum(_flip_average(model, s.contiguous(memory_format=torch.channels_last))
                                           for s in shifted)
    return logits


@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, mean, std, batch_size: int = 1000, tta: str | bool = "") -> Tensor:
    """Logits for uint8 images, batched; ``tta`` is "" (plain view), "flip" (True means this too)
    or "translate" (flips and one-pixel shifts, as airbench)."""
    tta = "flip" if tta is True else (tta or "")
    if tta not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {tta!r}: use flip or translate")
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = normalise(images[i : i + batch_size].to(device), mean, std)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = _views(model, x, tta)
        out.append(logits.cpu())
    return torch.cat(out)


def accuracy(model: nn.Module, split: Split, mean=CIFAR10_MEAN, std=CIFAR10_STD, tta: str | bool = "") -> float:
    return (predict_logits(model, split.images, mean, std, tta=tta).argmax(1) == split.labels).float().mean().item()


def flip_mask(n: int, seed: int, epoch: int) -> Tensor:
    """Which of ``n`` training images are mirrored in ``epoch`` (airbench's alternating flips):
    a random half in epoch 0, then each image every other epoch."""
    first = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
    return first ^ bool(epoch % 2)


def confusion_matrix(labels: Tensor, pred: Tensor, k: int) -> Tensor:
    """(k, k) int64 counts: rows the true class, columns the predicted one.

    >>> confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 2]), 3).tolist()
    [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    confusion = torch.zeros(k, k, dtype=torch.int64)
    confusion.index_put_((labels.cpu(), pred.cpu()), torch.ones_like(pred.cpu()), accumulate=True)
    return confusion


def per_class_accuracy(confusion: Tensor) -> Tensor:
    """Recall of each class (k,) from a confusion matrix; 0 for a class with no image.

    >>> per_class_accuracy(torch.tensor([[1, 0], [1, 1]])).tolist()
    [1.0, 0.5]
    """
    return confusion.diag().float() / confusion.sum(1).clamp(min=1).float()


# ----------------------------------------------------------------------------- optimiser and schedule
NO_DECAY = ("pos_embed",)  # parameters with 2+ dimensions kept out of weight decay (it pulls attention to uniform)
ATTN_SHAPE = ("log_temperature", "rel_bias.table")  # what sets how peaked attention rows are


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; weight decay on conv and linear weights only; attention's shape parameters
    (:data:`ATTN_SHAPE`) at ``cfg.attn_lr_scale`` times the learning rate (each group's ``lr_scale``)."""
    decay, no_decay, shape = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if any(k in name for k in ATTN_SHAPE):
            shape.append(p)
        else:
            (decay if p.ndim > 1 and not any(k in name for k in NO_DECAY) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    if shape:
        groups.append({"params": shape, "weight_decay": 0.0, "lr_scale": cfg.attn_lr_scale})
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))
    if cfg.optimizer != "sgd":
        raise TrainingError(f"unknown optimizer {cfg.optimizer!r}: use sgd or adamw")
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter of ``opt``, in the order of its state dict's indices."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group at ``lr`` times its ``lr_scale`` (see :func:`make_optimizer`)."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr``, then linear decay to zero (one-cycle shape)."""
    rise = max(1, int(cfg.warmup * total))
    return cfg.lr * (step / rise if step < rise else max(0.0, (total - step) / max(1, total - rise)))


class Lookahead:
    """airbench94's lookahead: an average of the weights (and BatchNorm statistics) that the
    trained weights are pulled back onto every ``EVERY`` steps; it forgets faster early on."""

    EVERY = 5

    def __init__(self, model: nn.Module, base: float) -> None:
        self.base = base
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def decay(self, step: int, total: int) -> float:
        """How much of the average the weights keep after ``step`` of ``total`` (1 at the end)."""
        return 1.0 if step >= total else self.base**self.EVERY * (step / total) ** 3

    @torch.no_grad()
    def step(self, model: nn.Module, step: int, total: int) -> None:
        """Call after each optimiser step, ``step`` counted from 1."""
        if step % self.EVERY and step < total:
            return
        state = model.state_dict()
        decay = self.decay(step, total)
        for k, avg in self.average.items():
            avg.lerp_(state[k], 1.0 - decay)
            state[k].copy_(avg)


# ----------------------------------------------------------------------------- saving and resuming
def save_state(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, cfg: TrainConfig, log: dict,
    lookahead: Lookahead | None = None,
) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if lookahead is not None:
        tensors.update({f"lookahead.{k}": v for k, v in lookahead.average.items()})
    names = _param_names(model, opt)
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{names[i]}/{k}"] = v
    atomic_write(path, tensors_to_bytes(tensors, {"epoch": epoch, "train": asdict(cfg), "log": log}))


def load_state(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, lookahead: Lookahead | None = None
) -> tuple[int, dict]:
    data = path.read_bytes()
    _, meta = read_header(data)
    tensors = st_load(data)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if lookahead is not None:
        for k, avg in lookahead.average.items():
            avg.copy_(tensors[f"lookahead.{k}"])
    sd = opt.state_dict()
    index = {name: i for i, name in enumerate(_param_names(model, opt))}
    params = [p for g in opt.param_groups for p in g["params"]]
    for k, v in tensors.items():
        if k.startswith("optim/"):  # keyed by parameter name: any grouping of the parameters resumes
            _, pname, name = k.split("/")
            if pname not in index:
                raise TrainingError(f"{path} holds optimiser state for {pname!r}, which this model has no "
                                    "trainable parameter of; start a new run instead of --resume")
            sd["state"].setdefault(index[pname], {})[name] = v
        elif k.startswith("opt."):  # older files, keyed by position in the optimiser's groups
            _, i, name = k.split(".", 2)
            if name != "step" and (int(i) >= len(params) or v.shape != params[int(i)].shape):
                raise TrainingError(f"{path} was saved by an older visattn that grouped the parameters differently; "
                                    "it cannot be resumed: start a new run (its checkpoint still loads)")
            sd["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(sd)
    return int(meta["epoch"]), meta.get("log", {})


# ----------------------------------------------------------------------------- the run
@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT.lock`` for a run (an flock, released by the kernel even on SIGKILL): a
    second run with the same output stops with a clear error instead of interleaving its
    checkpoint, state and metrics with this one's."""
    lock = paths(str(out))["lock"]
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TrainingError(f"another run is writing {out} (it holds {lock}); wait for it or choose another "
                                "--out") from None
        try:  # the lock file may have been removed between our open and our lock: then take the new one
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def lock_holder(out: str | os.PathLike) -> int | None:
    """The pid of the run holding ``OUT.lock`` (see :func:`run_lock`), or None if no run does."""
    lock = paths(str(out))["lock"]
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        text = os.read(fd, 32).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)


def train(cfg: TrainConfig, resume: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``cfg.model`` on ``cfg.data``; returns the model and its checkpoint's metadata.
    One run at a time per output file (see :func:`run_lock`); the status file says how far
    it got, and why it stopped if it failed."""
    rank, _ = dist_info()
    if rank:
        return _train(cfg, resume, None)
    with run_lock(Path(cfg.out)):
        status = StatusFile(paths(cfg.out)["status"])
        status.write("loading", message="starting", force=True)
        try:
            return _train(cfg, resume, status)
        except Exception as e:
            status.write("failed", message=str(e) or type(e).__name__, force=True)
            raise


def probe_images(spec: str, test: Split, n: int = 16) -> Tensor:
    """uint8 (n, 3, S, S): the probe image (``spec``: a test-split index or an image file),
    then the first test images, over which the probe's entropy is averaged."""
    side = test.images.shape[-1]
    if spec.isdigit():
        if int(spec) >= len(test):
            raise TrainingError(f"probe image {spec}: the test split has {len(test)} images (0..{len(test) - 1})")
        first = test.images[int(spec)][None]
    else:
        first = torch.from_numpy(image_to_uint8_array(load_image(spec), side)).permute(2, 0, 1)[None]
    return torch.cat([first, test.images[: n - 1]])


def _train(cfg: TrainConfig, resume: bool, status: StatusFile | None) -> tuple[nn.Module, dict[str, Any]]:
    rank, world = dist_info()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    amp = amp_enabled(device, cfg.amp)
    torch.manual_seed(cfg.seed)
    p = paths(cfg.out)
    resuming = resume and p["state"].exists()
    if rank == 0 and not resuming:
        atomic_write(p["metrics"], b"")  # a new run's curves start empty, before the data loads

    def loading(what: str):
        if status is None:
            return None
        return lambda done, total: status.write("loading", done, total, message=f"loading the {what} images")

    train_split = load_split(cfg.data, "train", cache=cfg.cache, progress=loading("training"))
    test_split = load_split(cfg.data, "test", cache=cfg.cache, progress=loading("test"))
    probe_x = normalise(probe_images(cfg.probe, test_split), CIFAR10_MEAN, CIFAR10_STD).to(device)
    if cfg.subset:
        train_split = train_split.subset(cfg.subset, cfg.seed)
    if cfg.eval_subset:
        test_split = test_split.subset(cfg.eval_subset, cfg.seed)
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    before = {"epochs": 0, "train_seconds": 0.0}
    if cfg.init:
        model, before = load_checkpoint(cfg.init)
        if before["model"] != cfg.model:
            raise TrainingError(f"--init {cfg.init} holds a {before['model']}, not a {cfg.model}")
    else:
        model = create_model(cfg.model, **{"num_classes": len(train_split.classes), **cfg.model_config})
        stem = getattr(model, "stem", None)
        if hasattr(stem, "fit"):
            stem.fit(normalise(train_split.images[:5000], mean, std))
    model = model.to(device, memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    lookahead = Lookahead(model, cfg.lookahead) if cfg.lookahead else None
    start, log = 0, {"seconds": 0.0, "cpu_seconds": 0.0, "best": 0.0}
    if resuming:
        start, log = load_state(p["state"], model, opt, lookahead)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    fwd = torch.compile(net) if cfg.compile else net
    images = train_split.images.to(device)
    labels = train_split.labels.to(device)
    n = len(labels)
    steps_per_epoch = n // (cfg.batch_size * world)
    if steps_per_epoch == 0:
        raise TrainingError(f"{n} training images are fewer than one batch of {cfg.batch_size * world}")
    total = steps_per_epoch * cfg.epochs
    metrics = p["metrics"].open("a") if rank == 0 else None
    end = min(cfg.epochs, start + cfg.stop_after) if cfg.stop_after else cfg.epochs
    clock = _Clock(steps=(end - start) * steps_per_epoch, epochs=end - start, eval_images=len(test_split),
                   batch_size=cfg.batch_size)
    if metrics and not resuming:  # the untrained model's attention: the starting point of the probe curves
        _write(metrics, {"type": "step", "epoch": 1, "step": 0, "total_steps": total, "probe_image": cfg.probe,
                         "probe": probe(model, probe_x)})
    meta: dict[str, Any] = {}
    for epoch in range(start, end):
        net.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # per-epoch: resumable exactly
        perm = torch.randperm(n, generator=gen)[: steps_per_epoch * cfg.batch_size * world]
        perm = perm.view(steps_per_epoch, world, cfg.batch_size)[:, rank]
        flips = flip_mask(n, cfg.seed, epoch)
        t0, cpu0, seen, loss_sum, correct = time.time(), time.process_time(), 0, 0.0, 0
        last_line = last_probe = t0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=None if rank == 0 else True)
        for i in bar:
            step = epoch * steps_per_epoch + i
            set_lr(opt, lr_at(step, total, cfg))
            idx = perm[i]
            x = augment(images[idx.to(device)], flips[idx].to(device), cfg.pad, cfg.cutout, gen)
            x = normalise(x, mean, std).contiguous(memory_format=torch.channels_last)
            y = labels[idx.to(device)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = fwd(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}; stopped, the last good checkpoint "
                    f"({p['out']}) is kept; try a lower --lr"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if lookahead is not None:
                lookahead.step(model, step + 1, total)
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            now = time.time()
            clock.step(now)
            if metrics and ((i + 1) % cfg.log_every == 0 or now - last_line >= cfg.log_seconds) and i + 1 < steps_per_epoch:
                line = {
                    "type": "step", "epoch": epoch + 1, "step": step + 1, "total_steps": total,
                    "loss": loss_sum / seen, "train_acc": correct / seen, "lr": lr_at(step, total, cfg),
                    "img_per_s": seen * world / (now - t0),
                }
                if now - last_probe >= cfg.probe_seconds:
                    line["probe"], last_probe = probe(model, probe_x), now
                _write(metrics, line)
                last_line = now
            if status:
                status.write("training", step + 1, total, eta=clock.eta(), epoch=epoch + 1, epochs=cfg.epochs)
        seconds = time.time() - t0
        log["seconds"] += seconds
        log["cpu_seconds"] = log.get("cpu_seconds", 0.0) + time.process_time() - cpu0  # process CPU (shared machine)
        if rank == 0:
            status.write("evaluating", step + 1, total, eta=clock.eta(), message=f"testing on {len(test_split)} images",
                         epoch=epoch + 1, epochs=cfg.epochs, force=True)
            t_eval = time.time()
            acc = accuracy(model, test_split, mean, std)
            clock.evaluated(time.time() - t_eval)
            log["best"] = max(log["best"], acc)
            line = {
                "type": "epoch", "epoch": epoch + 1, "epochs": cfg.epochs, "step": step + 1, "total_steps": total,
                "loss": loss_sum / seen, "train_acc": correct / seen, "test_acc": acc, "lr": lr_at(step + 1, total, cfg),
                "img_per_s": seen * world / seconds, "seconds": log["seconds"],
                "cpu_seconds": log["cpu_seconds"], "probe": probe(model, probe_x),
            }
            _write(metrics, line)
            meta = save_checkpoint(
                p["out"], model, classes=list(train_split.classes), mean=list(mean), std=list(std),
                dataset=train_split.source, train_images=n, accuracy=acc, accuracy_split=f"test ({len(test_split)} images)",
                epochs=before["epochs"] + epoch + 1, train_seconds=round(before["train_seconds"] + log["seconds"], 1),
                hardware=hardware(), train_config=asdict(cfg),
            )
            save_state(p["state"], model, opt, epoch + 1, cfg, log, lookahead)
            print(f"epoch {epoch + 1}: loss {line['loss']:.3f} test acc {acc:.4f} ({line['img_per_s']:.0f} img/s)", flush=True)
    if metrics:
        metrics.close()
    if status:
        status.write("done", total, total, eta=0.0, message=f"test accuracy {log['best']:.1%}" if end > start else "",
                     force=True, accuracy=meta.get("accuracy"))
    if world > 1:
        dist.barrier()
    return model.to(memory_format=torch.contiguous_format).eval(), meta


def _write(metrics, line: dict[str, Any]) -> None:
    metrics.write(json.dumps(line) + "\n")
    metrics.flush()


class _Clock:
    """Estimates the seconds a run has left from its own pace: the training steps still to
    go at the mean step time so far, plus one test-set evaluation per epoch left."""

    def __init__(self, steps: int, epochs: int, eval_images: int, batch_size: int) -> None:
        self.steps_left, self.epochs_left, self.eval_images, self.batch_size = steps, epochs, eval_images, batch_size
        self.steps_done, self.train_seconds, self.eval_seconds = 0, 0.0, None
        self.last = time.time()

    def step(self, now: float) -> None:
        self.steps_done += 1
        self.steps_left -= 1
        self.train_seconds += now - self.last
        self.last = now

    def evaluated(self, seconds: float) -> None:
        self.eval_seconds, self.epochs_left, self.last = seconds, self.epochs_left - 1, time.time()

    def eta(self) -> float | None:
        if not self.steps_done:
            return None
        per_step = self.train_seconds / self.steps_done
        # until the first evaluation: testing an image costs about a third of training on it
        per_eval = self.eval_seconds if self.eval_seconds is not None else \
            per_step * self.eval_images / (3 * self.batch_size)
        return self.steps_left * per_step + self.epochs_left * per_eval


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, torch {torch.__version__})"
