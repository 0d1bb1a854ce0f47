"""Bytes -> image -> model input, and the geometry that maps model pixels back to image pixels.

Resize policy (setting WARN_RESIZE):
- letterbox (default): the image is scaled, keeping its aspect, so its longest side fills the
  model's input; the rest is padded with the image's mean colour. Nothing is cropped.
- stretch: the image is scaled to the input size, aspect ignored.
Either way `Geometry.content` is the box of the model input that holds the image, so attention
maps are cropped to it and then scaled to the image: overlays line up with the original pixels.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import ImageTooLarge, InvalidImage, UnsupportedMedia

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO")


@dataclass(frozen=True)
class Geometry:
    width: int  # the decoded (EXIF-oriented) image
    height: int
    content: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the image inside the model input


def decode(data: bytes, max_pixels: int, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode an encoded image to 8-bit RGB, upright, first frame, transparency composited.

    Raises InvalidImage (empty, corrupt, truncated), UnsupportedMedia (not an image we read) or
    ImageTooLarge (more than `max_pixels`, checked from the header before decoding).
    """
    if not data:
        raise InvalidImage("the request carried no image data (empty body or file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise UnsupportedMedia(f"not an image in a supported format ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"image has more pixels than the limit of {max_pixels}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidImage(f"corrupt image header: {e}") from None
    if img.width * img.height > max_pixels:
        raise ImageTooLarge(f"image has {img.width}x{img.height} pixels, more than the limit of {max_pixels}")
    if img.width < 1 or img.height < 1:
        raise InvalidImage("image has no pixels")
    try:
        img.seek(0)  # animated: the first frame
        img = ImageOps.exif_transpose(img) or img
        return to_rgb(img, background)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise InvalidImage(f"corrupt or truncated {img.format} image: {e}") from None


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float32)
        peak = 1.0 if img.mode == "F" and a.max() <= 1.0 else (255.0 if a.max() <= 255 else 65535.0)
        img = Image.fromarray((a * (255.0 / peak)).clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB") if img.mode != "RGB" else img


def letterbox_box(width: int, height: int, size: tuple[int, int], policy: str) -> tuple[int, int, int, int]:
    """Where the image lands inside a model input of `size` (H, W): (x0, y0, x1, y1)."""
    h, w = size
    if policy == "stretch":
        return 0, 0, w, h
    scale = min(w / width, h / height)
    cw, ch = max(1, round(width * scale)), max(1, round(height * scale))
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return x0, y0, x0 + cw, y0 + ch


def to_input(img: Image.Image, size: tuple[int, int], policy: str = "letterbox") -> tuple[np.ndarray, Geometry]:
    """An RGB image to the model's float32 (3, H, W) input in [0, 1], and its geometry."""
    h, w = size
    box = letterbox_box(img.width, img.height, size, policy)
    x0, y0, x1, y1 = box
    resized = img.resize((x1 - x0, y1 - y0), Image.BILINEAR, reducing_gap=3.0)
    if (x1 - x0, y1 - y0) == (w, h):
        canvas = resized
    else:
        fill = tuple(int(c) for c in np.asarray(resized).reshape(-1, 3).mean(0))
        canvas = Image.new("RGB", (w, h), fill)
        canvas.paste(resized, (x0, y0))
    x = np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) * np.float32(1 / 255)  # (3, H, W)
    return x, Geometry(img.width, img.height, box)


def thumbnail(img: Image.Image, max_side: int) -> Image.Image:
    if max(img.size) <= max_side:
        return img
    t = img.copy()
    t.thumbnail((max_side, max_side), Image.BILINEAR)
    return t
