"""Tests for visattn.image_io: every corpus case, size limits, input kinds, fuzzing, preprocessing."""
from __future__ import annotations

import doctest
import io
import os
import pathlib
import subprocess
import sys
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageFilter

from tests import bad_inputs
from tests.bad_inputs import corpus_bytes, encode, make_corpus, noise_image
from visattn import image_io
from visattn.errors import ImageError
from visattn.image_io import MAX_BYTES, MAX_PIXELS, image_to_tensor, image_to_uint8_array, load_image

CASES = corpus_bytes()
GOOD = sorted(n for n, (_, _, ok) in CASES.items() if ok)
BAD = sorted(n for n, (_, _, ok) in CASES.items() if not ok)
EXPECTED_SIZE = {
    "gray16_png": (24, 16), "cmyk_jpeg": (16, 16), "palette_transparent_png": (20, 10), "rgba_png": (20, 10),
    "tiny_1x1_png": (1, 1), "wide_4000x3_png": (4000, 3), "animated_gif": (16, 16), "multipage_tiff": (12, 8),
    "exif_rotated_jpeg": (20, 40), "gray_jpeg": (32, 24), "photo_jpeg": (64, 48),
}
EXPECTED_MESSAGE = {
    "empty": "empty", "truncated_jpeg": "truncated", "truncated_png": "truncated", "png_bad_crc": "corrupt",
    "random_bytes": "not an image", "text": "not an image", "svg": "SVG", "html": "HTML",
    "huge_header": "400.0 MP", "big_header": "8000×5000 = 40.0 MP",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[pathlib.Path, bool]]:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def assert_clean_error(err: ImageError) -> None:
    msg = str(err)
    assert msg and "\n" not in msg and "\r" not in msg and len(msg) < 200, repr(msg)


def px(img: Image.Image, xy: tuple[int, int]) -> np.ndarray:
    return np.asarray(img.getpixel(xy), dtype=int)


# ---------------------------------------------------------------- the corpus

def test_corpus_is_complete(corpus: dict[str, tuple[pathlib.Path, bool]]) -> None:
    assert set(EXPECTED_SIZE) == set(GOOD) and set(EXPECTED_MESSAGE) == set(BAD)
    for name, (path, ok) in corpus.items():
        assert path.is_file() and ok == CASES[name][2]
        assert path.stat().st_size < 100_000


@pytest.mark.parametrize("name", GOOD)
def test_good_file_loads_as_rgb(corpus: dict[str, tuple[pathlib.Path, bool]], name: str) -> None:
    img = load_image(corpus[name][0])
    assert img.mode == "RGB" and img.size == EXPECTED_SIZE[name]


@pytest.mark.parametrize("name", BAD)
def test_bad_file_raises_one_line_image_error(corpus: dict[str, tuple[pathlib.Path, bool]], name: str) -> None:
    with pytest.raises(ImageError) as info:
        load_image(corpus[name][0])
    assert_clean_error(info.value)
    assert EXPECTED_MESSAGE[name] in str(info.value)


def test_exif_orientation_is_applied() -> None:
    img = load_image(CASES["exif_rotated_jpeg"][1])
    assert img.size == (20, 40)  # 40×20 stored, orientation 6
    assert np.abs(px(img, (10, 5)) - (255, 0, 0)).max() < 20  # the stored left half is now on top
    assert np.abs(px(img, (10, 35)) - (0, 0, 255)).max() < 20


@pytest.mark.parametrize("name", ["rgba_png", "palette_transparent_png"])
@pytest.mark.parametrize("background", [(255, 255, 255), (10, 20, 30)])
def test_alpha_is_composited_onto_background(name: str, background: tuple[int, int, int]) -> None:
    img = load_image(CASES[name][1], background=background)
    assert img.getpixel((2, 5)) == background  # fully transparent
    assert img.getpixel((15, 5)) == ((0, 255, 0) if name == "rgba_png" else (0, 0, 255))


def test_gray16_is_scaled_not_clipped() -> None:
    a = np.asarray(load_image(CASES["gray16_png"][1]))
    assert a.min() == 0 and a.max() == 255
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    flat = a[..., 0].ravel()
    assert (np.diff(flat.astype(int)) >= 0).all() and len(np.unique(flat)) > 200  # a smooth ramp


def test_animated_gif_gives_first_frame() -> None:
    assert np.abs(np.asarray(load_image(CASES["animated_gif"][1])) - (255, 0, 0)).max() <= 2


def test_multipage_tiff_gives_first_page() -> None:
    img = load_image(CASES["multipage_tiff"][1])
    assert img.size == (12, 8) and img.getpixel((5, 5)) == (200, 30, 30)


def test_cmyk_jpeg_colour() -> None:
    a = np.asarray(load_image(CASES["cmyk_jpeg"][1])).reshape(-1, 3).mean(0)
    assert np.abs(a - (255, 0, 0)).max() < 25


def test_grayscale_jpeg_and_tiny_image() -> None:
    a = np.asarray(load_image(CASES["gray_jpeg"][1]))
    assert (a[..., 0] == a[..., 2]).all()
    assert load_image(CASES["tiny_1x1_png"][1]).getpixel((0, 0)) == (10, 20, 30)


def _mode_image(mode: str) -> tuple[bytes, tuple[int, int, int]]:
    """An 8×6 image in `mode` (saved in a format that keeps the mode) and its expected RGB at (7, 5)."""
    if mode == "F":
        return encode(Image.fromarray(np.full((6, 8), 0.5, np.float32)), "TIFF"), (128, 128, 128)
    if mode == "I":
        return encode(Image.fromarray(np.full((6, 8), 65535, np.int32)), "TIFF"), (255, 255, 255)
    if mode == "I;16B":
        img = Image.frombytes("I;16B", (8, 6), np.full(48, 32896, ">u2").tobytes())
        return encode(img, "TIFF"), (128, 128, 128)
    if mode == "1":
        return encode(Image.new("1", (8, 6), 1), "PNG"), (255, 255, 255)
    if mode == "LA":
        return encode(Image.new("LA", (8, 6), (100, 0)), "PNG"), (255, 255, 255)
    if mode == "webp_anim":
        frames = [Image.new("RGB", (8, 6), c) for c in ((0, 0, 255), (255, 0, 0))]
        return encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True), (0, 0, 255)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["F", "I", "I;16B", "1", "LA", "webp_anim"])
def test_other_modes_convert_to_rgb(mode: str) -> None:
    data, expected = _mode_image(mode)
    img = load_image(data)
    assert img.mode == "RGB" and img.size == (8, 6)
    assert np.abs(px(img, (7, 5)) - expected).max() <= 1


def test_16bit_rgb_png() -> None:
    raw = b"".join(b"\x00" + b"\xff\xff\x00\x00\x80\x80" * 4 for _ in range(3))
    ihdr = bad_inputs.png_chunk(b"IHDR", (4).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([16, 2, 0, 0, 0]))
    png = bad_inputs.PNG_SIG + ihdr + bad_inputs.png_chunk(b"IDAT", zlib.compress(raw))
    png += bad_inputs.png_chunk(b"IEND", b"")
    assert load_image(png).getpixel((3, 2)) == (255, 0, 128)


# ---------------------------------------------------------------- size limits

@pytest.mark.parametrize("name", ["huge_header", "big_header"])
def test_pixel_limit_refused_from_header_without_decoding(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    calls: list[str] = []
    for cls in (Image.Image, ImageFile.ImageFile):
        original = cls.load

        def spy(self, *a, _original=original, **k):  # type: ignore[no-untyped-def]
            calls.append(type(self).__name__)
            return _original(self, *a, **k)

        monkeypatch.setattr(cls, "load", spy)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as info:
            load_image(CASES[name][1])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert calls == [] and peak < 50 * 2**20
    assert "32.0 MP" in str(info.value)
    assert_clean_error(info.value)


def test_max_pixels_argument_and_no_global_changes() -> None:
    before = (Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    photo = CASES["photo_jpeg"][1]
    with pytest.raises(ImageError, match="64×48"):
        load_image(photo, max_pixels=1000)
    assert load_image(photo, max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(ImageError):
        load_image(CASES["huge_header"][1], max_pixels=10**12)  # Pillow's own bomb guard still applies
    assert (Image.MAX_IMAGE_PIXELS, list(warnings.filters)) == before
    assert MAX_PIXELS == 32_000_000 and MAX_BYTES == 50 * 2**20


class CountingStream(io.RawIOBase):
    """A binary stream that records how much was asked of it."""

    def __init__(self, data: bytes) -> None:
        self.buf, self.requests = io.BytesIO(data), []

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        self.requests.append(n)
        return self.buf.read(n)


def test_max_bytes_enforced_for_every_input_kind(tmp_path: pathlib.Path) -> None:
    data = CASES["photo_jpeg"][1]
    limit = len(data) - 1
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    for source in (data, path, str(path), io.BytesIO(data)):
        with pytest.raises(ImageError, match="MB") as info:
            load_image(source, max_bytes=limit)
        assert_clean_error(info.value)
    stream = CountingStream(data * 100)
    with pytest.raises(ImageError, match="limit"):
        load_image(stream, max_bytes=limit)
    assert stream.requests == [limit + 1]  # never read the whole stream
    assert load_image(io.BytesIO(data), max_bytes=len(data)).size == (64, 48)
    with pytest.raises(ImageError, match=r"51\.0 MB; the limit is 50\.0 MB"):
        load_image(bytes(51 * 2**20))


# ---------------------------------------------------------------- input kinds

@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "str", "path", "bytesio", "file"])
def test_input_kinds(tmp_path: pathlib.Path, kind: str) -> None:
    data = CASES["photo_jpeg"][1]
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    if kind == "file":
        with open(path, "rb") as f:
            img = load_image(f)
    else:
        source = {"bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(data), "str": str(path),
                  "path": path, "bytesio": io.BytesIO(data)}[kind]
        img = load_image(source)
    assert img.mode == "RGB" and img.size == (64, 48)


def test_unreadable_sources(tmp_path: pathlib.Path) -> None:
    for source in (tmp_path / "missing.png", tmp_path, str(tmp_path / "bad\nname.png")):
        with pytest.raises(ImageError) as info:
            load_image(source)
        assert_clean_error(info.value)
    (tmp_path / "t.txt").write_text("hello")
    with open(tmp_path / "t.txt") as f, pytest.raises(ImageError, match="binary"):
        load_image(f)  # text-mode file
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]


# ---------------------------------------------------------------- fuzzing

def _fix_png_crcs(data: bytes) -> bytes:
    """Recompute every complete chunk's CRC so mutations reach the decoder instead of the checksum check."""
    out, pos = bytearray(data), 8
    while pos + 12 <= len(out):
        end = pos + 8 + int.from_bytes(out[pos:pos + 4], "big")
        if end + 4 > len(out):
            break
        out[end:end + 4] = zlib.crc32(bytes(out[pos + 4:end])).to_bytes(4, "big")
        pos = end + 4
    return bytes(out)


SEEDS = [bad_inputs.valid_png(), bad_inputs.valid_jpeg(), CASES["animated_gif"][1], CASES["multipage_tiff"][1],
         CASES["palette_transparent_png"][1], CASES["exif_rotated_jpeg"][1]]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))):]
    if data.startswith(bad_inputs.PNG_SIG) and draw(st.booleans()):
        return _fix_png_crcs(bytes(data))
    return bytes(data)


def _load_or_image_error(data: bytes) -> None:
    try:
        img = load_image(data, max_pixels=512 * 512)
    except ImageError as err:
        assert_clean_error(err)
    else:
        assert img.mode == "RGB" and img.width * img.height > 0


FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2048) | st.builds(lambda h, t: h + t, st.sampled_from([s[:16] for s in SEEDS]),
                                             st.binary(max_size=512)))
def test_fuzz_random_bytes(data: bytes) -> None:
    _load_or_image_error(data)


@FUZZ
@given(mutated())
def test_fuzz_mutated_images(data: bytes) -> None:
    _load_or_image_error(data)


def test_every_truncation_of_a_png_is_refused() -> None:
    data = bad_inputs.valid_png(8, 8)
    for n in range(len(data)):
        with pytest.raises(ImageError):
            load_image(data[:n])


# ---------------------------------------------------------------- preprocessing

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("wh", [(64, 48), (48, 64), (1, 1), (4000, 3), (224, 224)])
def test_image_to_tensor_shape_and_agreement(wh: tuple[int, int]) -> None:
    img = noise_image(*wh)
    t = image_to_tensor(img, 32, MEAN, STD)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32 and t.is_contiguous()
    a = image_to_uint8_array(img, 32)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    back = t * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    assert torch.allclose(back, torch.from_numpy(a).permute(2, 0, 1).float() / 255, atol=1e-5)


def test_image_to_tensor_normalises_constant_colour() -> None:
    t = image_to_tensor(Image.new("L", (50, 30), 200), 16, MEAN, STD)  # non-RGB input is converted
    expected = (200 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(t, expected.view(3, 1, 1).expand(3, 16, 16), atol=1e-5)


def test_center_crop_keeps_the_middle() -> None:
    img = Image.new("RGB", (90, 30), (255, 0, 0))
    img.paste((0, 255, 0), (30, 0, 60, 30))  # green centre square, red sides
    a = image_to_uint8_array(img, 10).astype(int)
    assert (a[:, 2:8] == (0, 255, 0)).all() and a[..., 0].mean() < 30


def test_preprocessing_rejects_bad_arguments() -> None:
    img = Image.new("RGB", (8, 8))
    for kwargs in ({"size": 0, "mean": MEAN, "std": STD}, {"size": 8, "mean": (0.5,), "std": STD},
                   {"size": 8, "mean": MEAN, "std": (1.0, 0.0, 1.0)}):
        with pytest.raises(ValueError):
            image_to_tensor(img, **kwargs)


def test_docstring_examples() -> None:
    assert doctest.testmod(image_io, optionflags=doctest.ELLIPSIS).failed == 0


# ---------------------------------------------------------------- real photos: big, decoded reduced

PEAK_SCRIPT = """
import resource, sys
from visattn import inference
from visattn.errors import ImageError
meta = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "image_size": 32}
try:
    image, _ = inference.prepare(sys.argv[1], meta)
    print("ok", image.shape)
except ImageError as e:
    print("error", e)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # peak resident set, KiB
"""


def peak_of_prepare(path: pathlib.Path) -> tuple[str, float]:
    """(first output line, peak resident MB) of a fresh process preparing ``path`` for a 32 px model."""
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, check=True).stdout.splitlines()
    return out[0], int(out[-1]) / 1024


def photo_like(w: int, h: int, noisy: bool = True) -> Image.Image:
    """A w×h photo stand-in: a small noise or gradient image enlarged (so it compresses like a photo, not like noise)."""
    small = noise_image(w // 8, h // 8) if noisy else noise_image(w // 8, h // 8).filter(ImageFilter.GaussianBlur(8))
    return small.resize((w, h), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def photo_48mp(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("big") / "phone_8000x6000.jpg"
    photo_like(8000, 6000).save(path, "JPEG", quality=90)
    return path


def test_48mp_jpeg_is_decoded_reduced_and_matches_the_full_decode(photo_48mp: pathlib.Path) -> None:
    data = photo_48mp.read_bytes()
    assert 5 * 2**20 < len(data) <= MAX_BYTES
    with pytest.raises(ImageError, match="48.0 MP; the limit is 32.0 MP"):
        load_image(data)  # decoded in full, it is over the full-decode limit
    img = load_image(data, min_side=image_io.DECODE_SIDE)
    assert img.mode == "RGB" and img.size == (2000, 1500)  # 1/4: the smallest DCT scale with a side >= 1024
    full = load_image(data, max_pixels=48_000_000)
    assert full.size == (8000, 6000)
    reduced, exact = image_to_uint8_array(img, 32).astype(int), image_to_uint8_array(full, 32).astype(int)
    assert np.abs(reduced - exact).mean() < 2 and np.abs(reduced - exact).max() < 16


def test_reduction_keeps_the_shorter_side_and_orientation() -> None:
    img = photo_like(4000, 1600, noisy=False)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: stored 4000×1600, shown 1600×4000
    jpeg = encode(img, "JPEG", quality=90, exif=exif.tobytes())
    assert load_image(jpeg, min_side=300).size == (400, 1000)  # 1/4 (1/8 would give 200 < 300)
    assert load_image(jpeg, min_side=1600).size == (1600, 4000)  # no reduction possible
    assert load_image(encode(img, "PNG"), min_side=300).size == (800, 320)  # PNG: decoded, then reduced by 5
    with pytest.raises(ValueError):
        load_image(jpeg, min_side=0)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_24mp_png_and_webp_are_answered(fmt: str) -> None:
    data = encode(photo_like(6000, 4000, noisy=False), fmt, **({"compress_level": 1} if fmt == "PNG" else
                                                               {"quality": 80, "method": 0}))
    img = load_image(data, min_side=image_io.DECODE_SIDE)
    assert img.mode == "RGB" and img.size == (2000, 1334)  # reduced by 3: 4000 // 1024
    assert load_image(data).size == (6000, 4000)


def test_peak_memory_of_a_48mp_jpeg_is_near_a_small_photo(photo_48mp: pathlib.Path, tmp_path: pathlib.Path) -> None:
    small = tmp_path / "small.jpg"
    photo_like(640, 480).save(small, "JPEG", quality=90)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(CASES["huge_header"][1])  # 20000×20000 = 400 MP claimed
    first, base = peak_of_prepare(small)
    assert first == "ok (32, 32, 3)"
    first, big = peak_of_prepare(photo_48mp)
    assert first == "ok (32, 32, 3)"
    assert big - base <= 100, f"48 MP JPEG peak {big:.0f} MB vs small photo {base:.0f} MB"
    first, bombed = peak_of_prepare(bomb)
    assert first.startswith("error image is") and first.endswith("400.0 MP; the limit is 32.0 MP")
    assert bombed - base <= 10, f"the bomb's peak {bombed:.0f} MB vs small photo {base:.0f} MB"
