"""Data sets as cached uint8 tensors, and batch augmentation on the training device.

Images are decoded once into an ``N×3×S×S`` uint8 tensor saved (safetensors) in a
cache folder, so a training run does no per-image Python work.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from visattn import paths
from visattn.errors import VisattnError
from visattn.image_io import image_to_uint8_array, load_image

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass
class Split:
    """One split of a data set: uint8 images (N, 3, S, S), int64 labels (N,), class names."""

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def sample_indices(self, n: int, seed: int = 0) -> Tensor:
        """Indices of a fixed random sample of ``n`` images (all of them, in order, if ``n`` >= len)."""
        if n >= len(self):
            return torch.arange(len(self))
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]

    def subset(self, n: int, seed: int = 0) -> "Split":
        """A fixed random sample of ``n`` images (all of them if ``n`` >= len)."""
        if n >= len(self):
            return self
        idx = self.sample_indices(n, seed)
        return Split(self.images[idx], self.labels[idx], self.classes, self.source)


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where decoded data sets live: ``override``, else ``visattn.paths.cache()``
    (``$VISATTN_CACHE`` or ``~/.cache/visattn``)."""
    path = Path(override).expanduser() if override else paths.cache()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _listing(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise VisattnError(f"{root} has no class folders (expected ImageFolder layout: {root}/<class>/<image>)")
    files = [
        (p, i)
        for i, c in enumerate(classes)
        for p in sorted((root / c).iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    return classes, files


def folder_key(root: Path, files: list[tuple[Path, int]], size: int) -> str:
    """The decoded-cache key of an image folder: its path, the side, and every file's name,
    class, byte size and modification time (one ``stat`` per file, no reading: 2-3 s for the
    50,000 training JPEGs on this busy 2-core machine, beside 4-5 s for listing them), so
    replacing or touching any image makes a new cache file. (An edit that keeps the size and
    restores the mtime is not seen.)"""
    listing = [(c, p.name, st.st_size, st.st_mtime_ns) for p, c in files for st in [os.stat(p)]]
    return hashlib.sha256(json.dumps([str(root), size, listing]).encode()).hexdigest()[:16]


Progress = Callable[[int, int], None]  # (images done, images in all)


def load_image_folder(root: str | os.PathLike, size: int = 32, cache: str | os.PathLike | None = None,
                      progress: Progress | None = None) -> Split:
    """Read an ImageFolder tree (``root/<class>/<image>``), decoding once into the cache;
    ``progress(done, total)`` is called along the way.

    Example (the CIFAR-10 JPEG copy: about a minute the first time, then read from the cache)::

        test = load_image_folder(visattn.paths.data() / "test")
        test.images.shape, test.classes[:2]  # (torch.Size([10000, 3, 32, 32]), ('airplane', 'automobile'))
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise VisattnError(f"data folder not found: {root}")
    classes, files = _listing(root)
    path = cache_dir(cache) / f"{root.name}-{size}-{folder_key(root, files, size)}.safetensors"
    if path.exists():
        t = load_file(path)
        if progress:
            progress(len(files), len(files))
        return Split(t["images"], t["labels"], tuple(classes), str(root))
    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for j, (p, _) in enumerate(tqdm(files, desc=f"decoding {root.name}", disable=None, mininterval=2)):
        images[j] = image_to_uint8_array(load_image(p), size)
        if progress and (j % 500 == 0 or j == len(files) - 1):
            progress(j + 1, len(files))
    t = {
        "images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        "labels": torch.tensor([c for _, c in files], dtype=torch.int64),
    }
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(t, tmp)
    os.replace(tmp, path)
    return Split(t["images"], t["labels"], tuple(classes), str(root))


def load_torchvision_cifar10(root: str | os.PathLike, train: bool, download: bool = True) -> Split:
    """CIFAR-10 through torchvision (downloads into ``root`` when asked and missing)."""
    from torchvision.datasets import CIFAR10

    ds = CIFAR10(str(root), train=train, download=download)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return Split(images, torch.tensor(ds.targets, dtype=torch.int64), tuple(ds.classes), "torchvision:CIFAR10")


def load_split(data: str | os.PathLike | None, split: str, size: int = 32, cache: str | None = None,
               progress: Progress | None = None) -> Split:
    """``data`` is a folder holding ``train/`` and ``test/`` (or one ImageFolder tree),
    ``cifar10`` for torchvision's download into the cache folder, or None for
    ``visattn.paths.data()``."""
    if data == "cifar10":
        return load_torchvision_cifar10(cache_dir(cache) / "torchvision", train=split == "train")
    root = Path(data) if data is not None else paths.data()
    return load_image_folder(root / split if (root / split).is_dir() else root, size, cache, progress)


def normalise(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (B, 3, H, W) -> normalised float."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def random_crop(x: Tensor, pad: int, gen: torch.Generator) -> Tensor:
    """Random translation by up to ``pad`` pixels with reflect padding, per image, batched."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[bi, ci, rows, cols]


def cutout(x: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """Zero one ``size``×``size`` square per image at a random place (clipped at the
    borders), batched: rows and columns ``c - size // 2 .. c - size // 2 + size - 1``.

    >>> x = cutout(torch.ones(64, 1, 32, 32), 4, torch.Generator().manual_seed(0))
    >>> int((x == 0).sum((1, 2, 3)).max())
    16
    """
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=gen).to(x.device)[:, None, None]
    cx = torch.randint(0, w, (b,), generator=gen).to(x.device)[:, None, None]
    ys = torch.arange(h, device=x.device)[None, :, None] - cy + size // 2  # 0..size-1 inside the hole
    xs = torch.arange(w, device=x.device)[None, None, :] - cx + size // 2
    hole = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)  # (B, H, W)
    return x * (~hole)[:, None].to(x.dtype)


def augment(x: Tensor, flip_mask: Tensor, pad: int, cutout_size: int, gen: torch.Generator) -> Tensor:
    """Flip the images where ``flip_mask`` is set, translate, optionally cut out."""
    x = torch.where(flip_mask[:, None, None, None], x.flip(-1), x)
    if pad:
        x = random_crop(x, pad, gen)
    if cutout_size:
        x = cutout(x, cutout_size, gen)
    return x
