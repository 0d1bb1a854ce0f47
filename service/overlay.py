"""Outputs -> PNG/WebP/JPEG: attention overlays of a stored prediction.

The maps themselves come from the model's graph (`attention_map_<i>`, `attention_combined`, and the
raw per-head masks `attention_<i>`), on the attended layer's grid. Here a map is only upsampled to
the model input (bilinear), cropped to the box that holds the image, normalized to 8-bit levels,
scaled to the output size, coloured, alpha-blended over the photo and encoded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cache

import imagecodecs
import numpy as np
from matplotlib import colormaps
from PIL import Image

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


def _resize(a: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a.astype(np.float32), "F").resize((width, height), Image.BILINEAR))


def levels(m: np.ndarray) -> np.ndarray:
    """A map as 8-bit levels from its own minimum (0) to its maximum (255); a flat map is all 0."""
    lo, hi = float(m.min()), float(m.max())
    if hi <= lo:
        return np.zeros(m.shape, np.uint8)
    return ((m - lo) * (255.0 / (hi - lo)) + 0.5).astype(np.uint8)


def to_image_grid(
    grid_map: np.ndarray, input_size: tuple[int, int], content: tuple[int, int, int, int], width: int, height: int
) -> Image.Image:
    """A map on a layer's grid (h, w), upsampled to the model input (H, W), cropped to the image's box,
    as 8-bit levels scaled to `width` x `height` (an "L" image).

    The last scaling is done on bytes, several times faster than on floats at 512x512, and stretched
    back to the full range when scaling narrowed it (shrinking averages peaks away): no pixel ends more
    than 4 of 255 levels from normalizing the scaled floats (2.2 when enlarging, as overlays mostly do).
    """
    x0, y0, x1, y1 = content
    on_input = _resize(grid_map, input_size[1], input_size[0])
    heat = Image.fromarray(levels(on_input[y0:y1, x0:x1]), "L").resize((width, height), Image.BILINEAR)
    lo, hi = heat.getextrema()
    if 0 < hi - lo < 255:
        heat = heat.point(levels(np.clip(np.arange(256), lo, hi)).tolist())  # lo..hi to 0..255
    return heat


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
        img.convert("RGB").save(buf, format="WEBP", quality=encoding.quality, method=0)
    elif fmt == "jpeg":
        img.convert("RGB").save(buf, format="JPEG", quality=encoding.quality)
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
