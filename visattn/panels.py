"""Raster panels for interactive reruns: colourised maps, labelled colour bars and titled
grids, composed with numpy and PIL in milliseconds (a matplotlib figure of the same grid
takes hundreds). The matplotlib figures in :mod:`visattn.plotting` remain for PNG export
and the CLI; these are what the dashboard redraws on every query click.
"""
from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

WHITE = 255
GAP = 6
CYAN = (0, 255, 255)


@lru_cache(maxsize=32)
def colour_table(cmap: str) -> np.ndarray:
    """A matplotlib colormap as a (256, 3) uint8 lookup table."""
    return np.round(matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


@lru_cache(maxsize=8)
def font(size: int = 13) -> ImageFont.FreeTypeFont:
    """DejaVu Sans (shipped with matplotlib): it has the √, × and · the labels use."""
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)


def colourise(m: np.ndarray, cmap: str = "inferno", vmin: float | None = None,
              vmax: float | None = None) -> np.ndarray:
    """Map values scaled from ``vmin`` to ``vmax`` (default: the map's own range, clipped)
    to RGB uint8 through the colormap; a constant map gets the colormap's low end.

    >>> colourise(np.array([[0.0, 1.0]]), "gray")[0].tolist()
    [[0, 0, 0], [255, 255, 255]]
    """
    m = np.asarray(m, dtype=np.float32)
    lo = float(np.min(m)) if vmin is None else float(vmin)
    hi = float(np.max(m)) if vmax is None else float(vmax)
    span = hi - lo
    if not np.isfinite(span) or span <= 0:
        idx = np.zeros(m.shape, dtype=np.uint8)
    else:
        idx = np.clip((m - lo) * (255.0 / span) + 0.5, 0, 255).astype(np.uint8)
    return colour_table(cmap)[idx]


def resize(rgb: np.ndarray, size: tuple[int, int], smooth: bool = False) -> np.ndarray:
    """Resize an (h, w, 3) uint8 image to ``size`` (height, width): nearest keeps grid
    cells visible, ``smooth`` is bilinear."""
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    method = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    return np.asarray(img.resize((size[1], size[0]), method))


def mark_query(rgb: np.ndarray, query_yx: tuple[float, float] | None) -> np.ndarray:
    """The image with a cyan + (black-edged) at the relative position ``query_yx``."""
    if query_yx is None:
        return rgb
    img = Image.fromarray(rgb, "RGB")
    h, w = rgb.shape[:2]
    y, x = query_yx[0] * h, query_yx[1] * w
    arm = max(4, min(h, w) // 14)
    draw = ImageDraw.Draw(img)
    for colour, width in (((0, 0, 0), 4), (CYAN, 2)):
        draw.line([(x - arm, y), (x + arm, y)], fill=colour, width=width)
        draw.line([(x, y - arm), (x, y + arm)], fill=colour, width=width)
    return np.asarray(img)


@lru_cache(maxsize=256)
def text_strip(text: str, width: int, size: int = 13) -> np.ndarray:
    """A white strip ``width`` px wide with ``text`` centred on it (cut to fit)."""
    f = font(size)
    while text and f.getlength(text) > width and len(text) > 2:
        text = text[:-2] + "…"
    img = Image.new("RGB", (max(1, width), size + 6), (WHITE,) * 3)
    ImageDraw.Draw(img).text((width / 2, 3), text, fill=(0, 0, 0), font=f, anchor="ma")
    return np.asarray(img)


def titled(panel: np.ndarray, title: str, size: int = 13) -> np.ndarray:
    """``panel`` with ``title`` written above it."""
    return np.concatenate([text_strip(title, panel.shape[1], size), panel], axis=0)


def colour_bar(vmin: float, vmax: float, cmap: str, height: int, label: str, ticks: int = 5,
               size: int = 12) -> np.ndarray:
    """A vertical colour bar ``height`` px tall, with ``ticks`` labelled values and the
    quantity's name written sideways (the labelled colour scale of a panel)."""
    f = font(size)
    bar_w, pad = 12, size // 2 + 3
    inner = max(2, height - 2 * pad)
    gradient = np.repeat(colour_table(cmap)[np.linspace(255, 0, inner).astype(int)][:, None], bar_w, axis=1)
    values = np.linspace(vmax, vmin, ticks)
    texts = [f"{v:.3g}" for v in values]
    text_w = int(max(f.getlength(t) for t in texts)) + 4
    img = Image.new("RGB", (bar_w + 4 + text_w + size + 6, height), (WHITE,) * 3)
    img.paste(Image.fromarray(gradient, "RGB"), (0, pad))
    draw = ImageDraw.Draw(img)
    for i, t in enumerate(texts):
        y = pad + i * (inner - 1) / max(ticks - 1, 1)
        draw.line([(bar_w, y), (bar_w + 3, y)], fill=(0, 0, 0))
        draw.text((bar_w + 5, y), t, fill=(0, 0, 0), font=f, anchor="lm")
    side = Image.new("RGB", (height, size + 4), (WHITE,) * 3)
    ImageDraw.Draw(side).text((height / 2, 2), label, fill=(0, 0, 0), font=f, anchor="ma")
    img.paste(side.rotate(90, expand=True), (bar_w + 4 + text_w + 2, 0))
    return np.asarray(img)


def _stack(panels: list[np.ndarray], axis: int, gap: int) -> np.ndarray:
    """Concatenate along ``axis`` (1: side by side, 0: one above the other), padding the
    other side with white to the largest panel (top/left-aligned), ``gap`` px apart."""
    other = 1 - axis
    size = max(p.shape[other] for p in panels)
    out = []
    for i, p in enumerate(panels):
        if i:
            shape = [size, size, 3]
            shape[axis] = gap
            out.append(np.full(shape, WHITE, np.uint8))
        pad = [(0, 0), (0, 0), (0, 0)]
        pad[other] = (0, size - p.shape[other])
        out.append(np.pad(p, pad, constant_values=WHITE))
    return np.concatenate(out, axis=axis)


def hstack(panels: list[np.ndarray], gap: int = GAP) -> np.ndarray:
    """Panels side by side, top-aligned on white, ``gap`` px apart."""
    return _stack(panels, 1, gap)


def vstack(panels: list[np.ndarray], gap: int = GAP) -> np.ndarray:
    """Panels one above the other, left-aligned on white, ``gap`` px apart."""
    return _stack(panels, 0, gap)


def blend(base: np.ndarray, colour: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * base + alpha * colour`` for two uint8 images of one shape."""
    out = base.astype(np.float32) * (1.0 - alpha) + colour.astype(np.float32) * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _fit(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    h, w = image.shape[:2]
    scale = size / max(h, w)
    shape = (max(1, round(h * scale)), max(1, round(w * scale)))
    return resize(np.asarray(image, dtype=np.uint8), shape), shape


def overlay_grid_image(image: np.ndarray, maps: dict[str, np.ndarray], alpha: float = 0.5,
                       cmap: str = "inferno", query_yx: tuple[float, float] | None = None, size: int = 128,
                       label: str = "attention weight") -> np.ndarray:
    """The layers × heads grid as one RGB image: a row per layer (titled with its name),
    a column per head plus their mean, every cell on one shared colour scale shown by a
    labelled colour bar, the query marked in every cell. ``maps`` holds (heads, h, w).

    >>> overlay_grid_image(np.zeros((32, 32, 3), np.uint8), {"a": np.random.rand(2, 4, 4)}).dtype
    dtype('uint8')
    """
    if not maps:
        raise ValueError("no maps to draw")
    base, shape = _fit(image, size)
    vmin = min(float(np.min(m)) for m in maps.values())
    vmax = max(float(np.max(m)) for m in maps.values())
    rows = []
    for layer, m in maps.items():
        m = np.asarray(m, dtype=np.float32)
        cells = [(f"head {i}", m[i]) for i in range(m.shape[0])] + [("mean", m.mean(0))]
        row = [titled(mark_query(blend(base, resize(colourise(c, cmap, vmin, vmax), shape, smooth=True), alpha),
                                 query_yx), title) for title, c in cells]
        grid = m.shape[1:]
        rows.append(titled(hstack(row), f"{layer} ({grid[0]}×{grid[1]} grid)", size=14))
    body = vstack(rows, gap=2 * GAP)
    return hstack([body, colour_bar(vmin, vmax, cmap, body.shape[0], label)], gap=2 * GAP)


def heatmap_panels(image: np.ndarray, maps: dict[str, np.ndarray], labels: dict[str, str],
                   query_yx: tuple[float, float] | None = None, cmap: str = "inferno", size: int = 160) -> np.ndarray:
    """The image, then each (h, w) map as a heatmap over the image's extent (grid cells
    kept sharp), side by side, each with its own labelled colour bar, the query marked
    in every panel; titles from ``labels`` (also the panel order)."""
    _, shape = _fit(image, size)
    panels = [titled(mark_query(_fit(image, size)[0], query_yx), "image")]
    for name, title in labels.items():
        if name not in maps:
            continue
        m = np.asarray(maps[name], dtype=np.float32)
        m = m.mean(0) if m.ndim == 3 else m
        lo, hi = float(np.min(m)), float(np.max(m))
        heat = mark_query(resize(colourise(m, cmap, lo, hi), shape), query_yx)
        panels.append(titled(hstack([heat, colour_bar(lo, hi, cmap, shape[0], title)], gap=2), title))
    return hstack(panels, gap=3 * GAP)


def to_jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    """JPEG bytes without chroma subsampling (sharp coloured text and grid edges); about a
    fifth of the PNG encoder's time, which matters for panels redrawn on every click.

    >>> to_jpeg(np.zeros((2, 2, 3), np.uint8))[:2] == bytes([0xFF, 0xD8])
    True
    """
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(buf, format="JPEG", quality=quality,
                                                                          subsampling=0)
    return buf.getvalue()

