"""A corpus of small good and bad image files, shared by the image, CLI and dashboard tests.

``make_corpus(dir)`` writes every case into ``dir`` and returns ``name -> (path, should_load_ok)``.
All files are tiny (a few KB); the "huge" headers claim big sizes without containing the pixels.
"""
from __future__ import annotations

import io
import pathlib
import random
import struct
import zlib

import numpy as np
from PIL import Image

PNG_SIG = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width×height RGB but whose IDAT holds a single row: never decode it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * min(width, 16)))
    return PNG_SIG + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth gradients plus noise (so JPEG/PNG data is not trivial)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(w + h - 2, 1)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8), "RGB")


def valid_png(w: int = 16, h: int = 16) -> bytes:
    return encode(noise_image(w, h), "PNG")


def valid_jpeg(w: int = 16, h: int = 16) -> bytes:
    return encode(noise_image(w, h), "JPEG", quality=90)


def _bad_idat_crc_png() -> bytes:
    data = bytearray(valid_png(32, 32))
    pos = data.index(b"IDAT") - 4
    end = pos + 8 + int.from_bytes(data[pos:pos + 4], "big")
    data[end] ^= 0xFF  # first byte of the IDAT checksum
    return bytes(data)


def _gray16_png() -> bytes:
    a = np.linspace(0, 65535, 24 * 16).round().astype(np.uint16).reshape(16, 24)
    return encode(Image.fromarray(a), "PNG")  # mode I;16, saved as a 16-bit grayscale PNG


def _palette_png() -> bytes:
    img = Image.new("P", (20, 10), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (10, 0, 20, 10))  # left half index 0 (transparent), right half blue
    return encode(img, "PNG", transparency=0)


def _rgba_png() -> bytes:
    img = Image.new("RGBA", (20, 10), (255, 0, 0, 0))  # fully transparent red
    img.paste((0, 255, 0, 255), (10, 0, 20, 10))  # opaque green right half
    return encode(img, "PNG")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _multipage_tiff() -> bytes:
    pages = [Image.new("RGB", (12, 8), (200, 30, 30)), Image.new("RGB", (30, 30), (30, 30, 200))]
    return encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def _exif_rotated_jpeg() -> bytes:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red: after orientation 6 it is the top half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>\n'
HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>nope</body></html>\n"


def corpus_bytes() -> dict[str, tuple[str, bytes, bool]]:
    """name -> (file name, content, should_load_ok), without touching the disk."""
    jpeg, png = valid_jpeg(64, 48), valid_png(64, 64)
    return {
        "empty": ("empty.png", b"", False),
        "truncated_jpeg": ("truncated.jpg", jpeg[: len(jpeg) // 2], False),
        "truncated_png": ("truncated.png", png[: len(png) // 2], False),
        "png_bad_crc": ("bad_crc.png", _bad_idat_crc_png(), False),
        "random_bytes": ("random.jpg", random.Random(1234).randbytes(4096), False),
        "text": ("notes.txt", b"hello, this is not an image\n" * 20, False),
        "svg": ("drawing.svg", SVG, False),
        "html": ("page.html", HTML, False),
        "huge_header": ("huge_20000x20000.png", png_with_header(20000, 20000), False),
        "big_header": ("big_8000x5000.png", png_with_header(8000, 5000), False),
        "gray16_png": ("gray16.png", _gray16_png(), True),
        "cmyk_jpeg": ("cmyk.jpg", encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95), True),
        "palette_transparent_png": ("palette.png", _palette_png(), True),
        "rgba_png": ("rgba.png", _rgba_png(), True),
        "tiny_1x1_png": ("tiny.png", encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), True),
        "wide_4000x3_png": ("wide.png", encode(Image.new("RGB", (4000, 3), (90, 90, 90)), "PNG"), True),
        "animated_gif": ("animated.gif", _animated_gif(), True),
        "multipage_tiff": ("pages.tiff", _multipage_tiff(), True),
        "exif_rotated_jpeg": ("rotated.jpg", _exif_rotated_jpeg(), True),
        "gray_jpeg": ("gray.jpg", encode(noise_image(32, 24).convert("L"), "JPEG"), True),
        "photo_jpeg": ("photo.jpg", jpeg, True),
    }


def make_corpus(dir: pathlib.Path) -> dict[str, tuple[pathlib.Path, bool]]:
    """Write every case into `dir`; return name -> (path, should_load_ok)."""
    dir = pathlib.Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[pathlib.Path, bool]] = {}
    for name, (filename, data, ok) in corpus_bytes().items():
        path = dir / filename
        path.write_bytes(data)
        out[name] = (path, ok)
    return out
