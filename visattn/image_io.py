"""Safe image loading (any input -> RGB or ImageError) and model preprocessing.

Limits (stated on the dashboard's upload widget): files up to :data:`MAX_BYTES`; JPEGs up
to :data:`MAX_JPEG_PIXELS` when decoded reduced (``min_side``: libjpeg's DCT scaling
decodes a 48 MP phone photo at 1/4 size, so it costs about what a 3 MP one does); every
other image, and a JPEG decoded in full, up to :data:`MAX_PIXELS` (a 24 MP PNG or WebP
fits). Pixel counts are read from the header and refused before anything is decoded.
"""
from __future__ import annotations

import io
import os
import re
import warnings
import zlib
from typing import BinaryIO, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from visattn.errors import ImageError

MAX_PIXELS: int = 32_000_000  # decoded in full: a 24 MP (6000×4000) PNG or WebP fits
MAX_JPEG_PIXELS: int = 80_000_000  # a JPEG decoded reduced: 48-64 MP phone photos fit (Pillow's bomb guard is 89 MP)
MAX_BYTES: int = 50 * 1024 * 1024  # a 24 MP photo saved as PNG is 30-50 MB
DECODE_SIDE: int = 1024  # shorter side a big photo is decoded to for the dashboard and CLI (>= 2× the 320 px display)
# Decoders we trust with untrusted uploads (no EPS/Ghostscript, no exotic plugins).
FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO", "GIF", "WEBP", "TIFF", "BMP", "ICO", "PPM", "AVIF")
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _too_many_pixels(w: int, h: int, max_pixels: int) -> ImageError:
    return ImageError(f"image is {w}×{h} = {w * h / 1e6:.1f} MP; the limit is {max_pixels / 1e6:.1f} MP")


def _read_source(source: str | os.PathLike | bytes | BinaryIO, max_bytes: int) -> bytes:
    """Return the raw bytes of `source`, refusing more than `max_bytes` before reading it all."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > max_bytes:
            raise ImageError(f"file is {_mb(len(source))}; the limit is {_mb(max_bytes)}")
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        name = os.path.basename(os.fsdecode(source))[:80].encode("unicode_escape").decode("ascii")
        try:
            size = os.path.getsize(source)
            if size > max_bytes:
                raise ImageError(f"file is {_mb(size)}; the limit is {_mb(max_bytes)}")
            with open(source, "rb") as f:
                data = f.read(max_bytes + 1)
        except FileNotFoundError:
            raise ImageError(f"file not found: {name}") from None
        except OSError as e:
            raise ImageError(f"cannot read file {name}: {type(e).__name__}") from e
    elif hasattr(source, "read"):
        try:
            data = source.read(max_bytes + 1)
        except Exception as e:
            raise ImageError(f"cannot read the upload: {type(e).__name__}") from e
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError("cannot read the upload: open the file in binary mode")
    else:
        raise TypeError(f"load_image expects a path, bytes or a binary file, not {type(source).__name__}")
    if len(data) > max_bytes:
        raise ImageError(f"file is larger than the {_mb(max_bytes)} limit")
    return bytes(data)


def _sniff(data: bytes) -> None:
    """Refuse empty, SVG, HTML and PNGs with a bad chunk checksum, with a clear message."""
    if not data:
        raise ImageError("not an image: the file is empty")
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<?xml") or b"<svg" in head:
        raise ImageError("SVG is not supported: upload a PNG or JPEG")
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head[:256]:
        raise ImageError("not an image: this looks like an HTML page")
    if data.startswith(_PNG_SIG):  # Pillow skips IDAT checksums; verify every chunk we can
        pos, kind = len(_PNG_SIG), b""
        while kind != b"IEND":
            end = pos + 8 + int.from_bytes(data[pos:pos + 4], "big")
            if end + 4 > len(data):
                raise ImageError("image is truncated or corrupt (the PNG data ends early)")
            kind = data[pos + 4:pos + 8]
            if zlib.crc32(data[pos + 4:end]) != int.from_bytes(data[end:end + 4], "big"):
                raise ImageError("image is truncated or corrupt (PNG checksum mismatch)")
            pos = end + 4


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Convert any Pillow mode to RGB: stretch high bit depths, composite alpha onto `background`."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
            a = a / 257.0
        elif mode == "F" and lo >= 0 and hi <= 1:
            a = a * 255.0
        elif not (lo >= 0 and hi <= 255):
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode not in ("RGBA", "RGBa", "LA", "La", "PA", "P") and "transparency" not in img.info:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def load_image(
    source: str | os.PathLike | bytes | BinaryIO,
    *,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
    background: tuple[int, int, int] = (255, 255, 255),
    min_side: int | None = None,
    max_jpeg_pixels: int = MAX_JPEG_PIXELS,
) -> Image.Image:
    """Load the first frame of an image as upright RGB; anything unusable raises ImageError.

    Size limits are checked before decoding (bytes from the file size, pixels from the header).
    ``min_side``: the image may come back smaller, its shorter side still ``>= min_side``
    (or its full size): a JPEG is then decoded reduced (1/2, 1/4 or 1/8, libjpeg's DCT
    scaling; its header may claim up to ``max_jpeg_pixels``), anything else is decoded in
    full and reduced by an integer factor. Without it, every image is decoded in full.

    >>> import io; buf = io.BytesIO(); Image.new("LA", (4, 2)).save(buf, "PNG")
    >>> img = load_image(buf.getvalue()); img.mode, img.size
    ('RGB', (4, 2))
    """
    if min_side is not None and min_side <= 0:
        raise ValueError(f"min_side must be positive, got {min_side}")
    background = tuple(int(c) for c in background)  # type: ignore[assignment]
    if len(background) != 3 or not all(0 <= c <= 255 for c in background):
        raise ValueError(f"background must be three ints in 0..255, got {background!r}")
    data = _read_source(source, max_bytes)
    _sniff(data)
    Image.init()
    formats = [f for f in FORMATS if f in Image.OPEN]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's notes on damaged metadata are not the caller's concern
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=formats)  # lazy: reads the header only
        except Image.UnidentifiedImageError:
            raise ImageError("not an image: unrecognised or unsupported file format") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            m = re.search(r"\((\d+) pixels\)", str(e))
            got = f"{int(m.group(1)) / 1e6:.1f} MP" if m else "too large"
            raise ImageError(f"image is {got}; the limit is {max_pixels / 1e6:.1f} MP") from e
        except Exception as e:
            raise ImageError(f"image is truncated or corrupt ({type(e).__name__})") from e
        try:
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageError(f"image has an empty size ({w}×{h})")
            reduced = min_side is not None and img.format in ("JPEG", "MPO")
            limit = max_jpeg_pixels if reduced else max_pixels
            if w * h > limit:
                raise _too_many_pixels(w, h, limit)
            if reduced:
                img.draft(None, (min_side, min_side))  # scale s: shorter side // s >= min_side
            img.load()
            img = ImageOps.exif_transpose(img) or img
            out = _to_rgb(img, background)
            factor = min(out.size) // min_side if min_side else 1
            out = out.reduce(factor) if factor >= 2 else out
            out.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"image frame is too large; the limit is {max_pixels / 1e6:.1f} MP") from e
        except MemoryError as e:
            raise ImageError("image is too large to decode in the available memory") from e
        except Exception as e:
            raise ImageError(f"image is truncated or corrupt ({type(e).__name__})") from e
    if out.width <= 0 or out.height <= 0 or out.width * out.height > limit:
        raise _too_many_pixels(out.width, out.height, limit)
    return out


def crop_box(w: int, h: int, size: int, resize: int | Sequence[int] | None = None) -> tuple[float, float, float, float]:
    """The part of a w×h photo a model sees, in photo pixels (left, top, right, bottom):
    the photo is resized (``resize``: shorter side to that many pixels, or exactly
    [height, width]; None: shorter side to ``size``), then centre-cropped to size×size.

    >>> crop_box(400, 200, 224, 256)  # shorter side 200 -> 256, crop 224 of it: 175 photo px
    (112.5, 12.5, 287.5, 187.5)
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if resize is None or isinstance(resize, int):
        side = min(w, h) * size / (resize or size)
        cw = ch = side
    else:
        ch, cw = h * size / resize[0], w * size / resize[-1]
    cw, ch = min(cw, w), min(ch, h)
    return ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)


def _square(img: Image.Image, size: int, resize: int | Sequence[int] | None = None,
            interpolation: str = "bicubic") -> Image.Image:
    """The :func:`crop_box` of ``img`` at size×size (one antialiased resampling pass)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    box = crop_box(*img.size, size, resize)
    resample = Image.Resampling.__members__.get(interpolation.upper(), Image.Resampling.BICUBIC)
    return img.resize((size, size), resample, box=box)


def image_to_uint8_array(img: Image.Image, size: int, resize: int | Sequence[int] | None = None,
                         interpolation: str = "bicubic") -> np.ndarray:
    """Resize/crop like image_to_tensor, for display: (size, size, 3) uint8.

    >>> image_to_uint8_array(Image.new("RGB", (30, 20), (9, 8, 7)), 16)[0, 0].tolist()
    [9, 8, 7]
    """
    return np.asarray(_square(img, size, resize, interpolation), dtype=np.uint8).copy()


def image_to_tensor(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float],
                    resize: int | Sequence[int] | None = None, interpolation: str = "bicubic") -> torch.Tensor:
    """Resize/crop to size×size (see :func:`crop_box`) and normalise per channel: float32
    tensor (3, size, size).

    >>> t = image_to_tensor(Image.new("RGB", (30, 20), (255, 0, 0)), 8, (0.5,) * 3, (0.5,) * 3)
    >>> tuple(t.shape), t[:, 0, 0].tolist()
    ((3, 8, 8), [1.0, -1.0, -1.0])
    """
    if len(mean) != 3 or len(std) != 3 or any(s == 0 for s in std):
        raise ValueError("mean and std need three values each, std non-zero")
    x = torch.from_numpy(image_to_uint8_array(img, size, resize, interpolation)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((x - m) / sd).contiguous()
