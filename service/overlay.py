"""Attention maps from model outputs, and their PNG overlays.

Masks live on the model input's grid. A map is mixed from heads (by the layer gates) and, for
`combined`, from layers (by the global gates); it is upsampled to the input (bilinear), cropped to
the box that holds the image, scaled to the output size, normalized to [0, 1], coloured and
alpha-blended over the photo.
"""

from __future__ import annotations

import io
from functools import cache

import numpy as np
from matplotlib import colormaps
from PIL import Image

from service.errors import InvalidRequest

COLORMAPS = ("viridis", "turbo", "jet")


def _resize(a: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a.astype(np.float32), "F").resize((width, height), Image.BILINEAR))


def layer_map(masks: np.ndarray, gates: np.ndarray, head: int | None, size: tuple[int, int]) -> np.ndarray:
    """One attended layer's map on the input grid (H, W), summing to 1.

    masks: (K, h, w); gates: (K,). `head` picks one head; None mixes them by their gates.
    """
    k = masks.shape[0]
    if head is not None and not 0 <= head < k:
        raise InvalidRequest(f"head must be between 0 and {k - 1} for this layer, got {head}")
    m = masks[head] if head is not None else np.tensordot(gates, masks, axes=1)  # (h, w)
    up = _resize(m, size[1], size[0])
    return up / max(float(up.sum()), 1e-12)


def combined_map(
    masks: list[np.ndarray], gates: list[np.ndarray], global_gates: np.ndarray, size: tuple[int, int]
) -> np.ndarray:
    """Layers mixed by their global gates (the backbone's weight left out, the rest renormalized).

    As in `models.warn.combined_attention`: each layer's gate-mixed mask is summed into the
    coarsest attended grid first, so layers are compared as attention mass per equal region,
    then the mix is upsampled to the input grid.
    """
    gh, gw = masks[-1].shape[-2:]
    w = global_gates[: len(masks)]
    w = w / max(float(w.sum()), 1e-12)
    mixed = np.zeros((gh, gw), np.float32)
    for wi, m, g in zip(w, masks, gates):
        layer = np.tensordot(g, m, axes=1)  # (h, w)
        h, wd = layer.shape
        if (h, wd) != (gh, gw):  # area-average down, then back to mass per cell
            layer = np.asarray(Image.fromarray(layer.astype(np.float32), "F").resize((gw, gh), Image.BOX))
            layer = layer * (h * wd / (gh * gw))
        mixed += wi * layer
    up = _resize(mixed, size[1], size[0])
    return up / max(float(up.sum()), 1e-12)


def to_image_grid(grid_map: np.ndarray, content: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    """Crop a map on the input grid to the image's box and scale it to `width` x `height`."""
    x0, y0, x1, y1 = content
    return _resize(grid_map[y0:y1, x0:x1], width, height)


def output_size(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    if not max_size or max(width, height) <= max_size:
        return width, height
    scale = max_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


@cache
def _palette(name: str) -> bytes:
    return (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8).tobytes()  # 256 RGB triples


def colorize(m: np.ndarray, colormap: str) -> Image.Image:
    """A map, normalized to its own min and max, as a palette image in the colormap's colours."""
    if colormap not in COLORMAPS:
        raise InvalidRequest(f"colormap must be one of {', '.join(COLORMAPS)}, got {colormap!r}")
    lo, hi = float(m.min()), float(m.max())
    scaled = (m - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(m)
    img = Image.fromarray(scaled.astype(np.uint8), "L")
    img.putpalette(_palette(colormap))  # turns the grey levels into palette indices
    return img


def render(m: np.ndarray, photo: Image.Image | None, colormap: str, alpha: float) -> bytes:
    """PNG bytes of the coloured map, blended over `photo` (same size) unless it is None.

    A bare heatmap stays a palette PNG (a byte per pixel), which encodes about 5x faster than RGB.
    """
    heat = colorize(m, colormap)
    if photo is not None:
        heat = Image.blend(photo.convert("RGB"), heat.convert("RGB"), alpha)
    buf = io.BytesIO()
    heat.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
