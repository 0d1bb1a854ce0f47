"""Outputs -> PNG/WebP/JPEG: attention overlays of a stored prediction.

The maps themselves come from the model's graph (`attention_map_<i>`, `attention_combined`, and the
raw per-head masks `attention_<i>`), on the attended layer's grid. Here a map is only upsampled to
the model input (bilinear), cropped to the box that holds the image, scaled to the output size,
normalized to 8-bit levels, coloured, alpha-blended over the photo and encoded.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import cache, lru_cache

import imagecodecs
import numpy as np
from matplotlib import colormaps
from PIL import Image
from threadpoolctl import threadpool_limits

try:  # fpng: a PNG writer built for speed (SIMD deflate, one fixed filter); x86-64 wheels only
    from fpng import fpng_ext
except ImportError:
    fpng_ext = None

from service.errors import InvalidRequest
from service.store import StoredPrediction

COLORMAPS = ("viridis", "turbo", "jet")
FORMATS = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


@dataclass(frozen=True)
class OverlayParams:
    layer: str = "combined"  # an attended layer index, or "combined"
    head: int | None = None  # one head, or None for the gate-weighted mix
    colormap: str = "viridis"
    alpha: float = 0.5
    max_size: int | None = None
    mode: str = "overlay"  # or "heatmap": the coloured map alone
    format: str | None = "png"  # or "webp", "jpeg"; None (no query parameter): the route picks


@dataclass(frozen=True)
class Encoding:
    """Encoder settings from the service's Settings: speed over size by default."""

    png_compress_level: int = 1  # 1: fpng where it is installed; 0, 2-9: zlib at that level
    quality: int = 85  # WebP and JPEG


def one_blas_thread() -> None:
    """Run this process's matrix products (`to_image_grid`) on the calling thread. Overlays already render
    in parallel, one per request; OpenBLAS would add a thread per core to each product, which then spin on
    those cores: a 512x512 overlay took 9.5 ms of CPU for 4.8 ms of wall time on 2 cores, 4.8 ms with this."""
    threadpool_limits(1, user_api="blas")


def levels(m: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """A map as 8-bit levels from its own minimum (0) to its maximum (255); a flat map is all 0.
    `overwrite`: `m` (float32) may be scaled in place, where a large one is not needed after."""
    lo, hi = float(m.min()), float(m.max())
    if hi <= lo:
        return np.zeros(m.shape, np.uint8)
    scaled = m if overwrite and m.dtype == np.float32 else m.astype(np.float32)
    scaled -= lo
    scaled *= 255.0 / (hi - lo)
    scaled += 0.5
    return scaled.astype(np.uint8)


def resampling(n: int, m: int) -> np.ndarray:
    """Pillow's bilinear resize of n samples to m, as an (n, m) matrix: column j holds the weights of output
    sample j. Pillow resizes one axis and then the other, so `rows.T @ image @ cols` is its 2-D resize.

    Its weights: output j centred at (j + 0.5) * n/m, a triangle of half-width max(n/m, 1) (wider when
    shrinking, which averages), normalized to sum 1."""
    scale = n / m
    half_width = max(scale, 1.0)
    centre = (np.arange(m) + 0.5) * scale  # (m,)
    taps = np.floor(centre - half_width + 0.5).astype(np.int64) + np.arange(2 * math.ceil(half_width) + 1)[:, None]
    weights = np.clip(1.0 - np.abs(taps + 0.5 - centre) / half_width, 0.0, None)  # (taps, m): only the band
    weights[(taps < 0) | (taps >= n)] = 0.0
    weights /= weights.sum(0)
    matrix = np.zeros((n, m), np.float32)
    inside = weights > 0
    matrix[taps[inside], np.broadcast_to(np.arange(m), taps.shape)[inside]] = weights[inside]
    return matrix


@lru_cache(maxsize=32)
def _axis(grid: int, model: int, start: int, stop: int, out: int) -> np.ndarray:
    """(grid, out): a layer's grid to the model input, cropped to [start, stop), scaled to `out` samples."""
    matrix = resampling(grid, model)[:, start:stop] @ resampling(stop - start, out)
    matrix.flags.writeable = False  # shared by every caller of the cache
    return matrix


def axis(grid: int, model: int, start: int, stop: int, out: int) -> np.ndarray:
    """`_axis`, cached where it is at most 256 KB (a 48-cell grid to 1,365 pixels), 8 MB in all; any larger
    is made anew, so that no choice of sizes fills memory."""
    if grid * out <= 65536:
        return _axis(grid, model, start, stop, out)
    return _axis.__wrapped__(grid, model, start, stop, out)


def to_image_grid(
    grid_map: np.ndarray, input_size: tuple[int, int], content: tuple[int, int, int, int], width: int, height: int
) -> Image.Image:
    """A map on a layer's grid (h, w), upsampled to the model input (H, W), cropped to the image's box and
    scaled to `width` x `height`, as 8-bit levels (an "L" image).

    The resizes and the crop are linear, so they run as one matrix per axis, (height, h) @ map @ (w, width):
    exact to float rounding, where resizing the levels image was within 4 of 255 levels, at about h
    multiply-adds an output pixel.
    """
    x0, y0, x1, y1 = content
    h, w = grid_map.shape
    rows = axis(h, input_size[0], y0, y1, height)  # (h, height)
    cols = axis(w, input_size[1], x0, x1, width)  # (w, width)
    scaled = rows.T @ (grid_map.astype(np.float32) @ cols)  # (height, width): 4 MB at 1024x1024
    return Image.fromarray(levels(scaled, overwrite=True), "L")


def output_size(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    if not max_size or max(width, height) <= max_size:
        return width, height
    scale = max_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


@cache
def _palette(name: str) -> bytes:
    return (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8).tobytes()  # 256 RGB triples


def colorize(heat: Image.Image, colormap: str) -> Image.Image:
    """8-bit levels ("L") as a palette image in the colormap's colours."""
    if colormap not in COLORMAPS:
        raise InvalidRequest(f"colormap must be one of {', '.join(COLORMAPS)}, got {colormap!r}")
    img = heat.copy()
    img.putpalette(_palette(colormap))  # turns the levels into palette indices
    return img


def as_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image too


def encode(img: Image.Image, fmt: str = "png", encoding: Encoding = Encoding()) -> bytes:
    buf = io.BytesIO()
    if fmt == "png" and img.mode == "RGB":
        pixels = np.asarray(img)
        if encoding.png_compress_level == 1 and fpng_ext is not None:
            return fpng_ext.encode_ndarray(pixels)  # a 512x512 overlay in 2.5 ms, about 5% larger than libpng's
        # libpng with one fixed filter and run-length zlib (OpenCV's fast settings): 512x512 in
        # 10 ms against Pillow's 33 ms, which tries every filter on every row
        return imagecodecs.png_encode(pixels, level=encoding.png_compress_level, strategy=3, filter=16)
    if fmt == "png":  # a palette heatmap: Pillow writes it unfiltered, a byte a pixel, fast already
        img.save(buf, format="PNG", compress_level=encoding.png_compress_level)
    elif fmt == "webp":
        as_rgb(img).save(buf, format="WEBP", quality=encoding.quality, method=0)
    elif fmt == "jpeg":
        as_rgb(img).save(buf, format="JPEG", quality=encoding.quality)
    else:
        raise InvalidRequest(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return buf.getvalue()


def render(
    heat: Image.Image,
    photo: Image.Image | None,
    colormap: str,
    alpha: float,
    fmt: str = "png",
    encoding: Encoding = Encoding(),
) -> bytes:
    """Encoded bytes of the coloured map (`to_image_grid`'s levels), blended over `photo` (same size)
    unless it is None.

    A bare heatmap stays a palette PNG (a byte per pixel), which encodes about 5x faster than RGB.
    """
    coloured = colorize(heat, colormap)
    if photo is not None:
        coloured = Image.blend(photo, coloured.convert("RGB"), alpha)
    return encode(coloured, fmt, encoding)


def layer_grid(stored: StoredPrediction, layer: str, head: int | None) -> np.ndarray:
    """The map that `layer` and `head` name, on its layer's grid."""
    layers = len(stored.maps)
    if layer == "combined":
        if head is not None:
            raise InvalidRequest("head applies to one attended layer, not to 'combined'")
        return stored.combined
    # ASCII digits only: isdigit() also admits "²", which int() refuses
    if not (layer.isascii() and layer.isdigit() and len(layer) <= 3 and int(layer) < layers):
        raise InvalidRequest(f"layer must be 'combined' or an attended layer index 0..{layers - 1}, got {layer[:20]!r}")
    i = int(layer)
    heads = stored.masks[i].shape[0]
    if head is not None and not 0 <= head < heads:
        raise InvalidRequest(f"head must be between 0 and {heads - 1} for this layer, got {head}")
    return stored.maps[i] if head is None else stored.masks[i][head]


def draw(
    stored: StoredPrediction,
    picture: Image.Image,
    p: OverlayParams,
    input_size: tuple[int, int],
    encoding: Encoding = Encoding(),
) -> bytes:
    """The overlay that `p` describes, of a stored prediction whose image, decoded, is `picture`, encoded."""
    grid = layer_grid(stored, p.layer, p.head)
    out_w, out_h = output_size(*picture.size, p.max_size)
    heat = to_image_grid(grid, input_size, stored.content, out_w, out_h)
    photo = None
    if p.mode == "overlay":
        photo = picture if picture.size == (out_w, out_h) else picture.resize((out_w, out_h), Image.BILINEAR)
    return render(heat, photo, p.colormap, p.alpha, p.format, encoding)
