"""Bytes -> image: decode an upload to upright 8-bit RGB, refusing what is not an image or too large.

JPEGs are decoded at reduced scale (libjpeg's DCT scaling, Pillow's draft mode) when a 1/2, 1/4 or
1/8 scale still covers everything the image is used for: the model input and the stored overlay
image. A 4000x3000 photo is then decoded at 2000x1500 for a 1024-pixel overlay, or at 500x375
when only a prediction is wanted.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import ImageTooLarge, InvalidImage, UnsupportedMedia

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO")
# A PNG's text chunks are inflated as its header is read, though nothing here uses them. Pillow allows
# 64 MB of them an image: 0.16 s of a core from a 63 KB file. Editors and cameras write kilobytes.
PNG_TEXT_BYTES = 4 * 1024 * 1024
# libjpeg decodes every scan of a progressive JPEG over the whole image, at any DCT scale: a 12-megapixel
# JPEG with one scan repeated 1,000 times (97 KB) took 4 s of a core. Encoders write 1 to about 10 scans
# (libjpeg's progressive default: 10); an EXIF thumbnail's own scans count too. libtiff holds each strip of a
# JPEG-compressed TIFF to it as well (create_app sets libtiff's limit, whose default is 100).
JPEG_MAX_SCANS = 64
SOS = b"\xff\xda"  # start of scan: entropy-coded data stuffs every 0xFF byte, so the marker is never inside it
ORIENTATION = 0x0112  # the EXIF tag


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # RGB, upright; smaller than the original when decoded at reduced scale
    width: int  # the original (EXIF-oriented) size, which overlays and answers refer to
    height: int


@dataclass(frozen=True)
class Need:
    """How much of an image its uses need: at least `longest` pixels on its longest side and
    `shortest` on its shortest (each capped at the original's)."""

    longest: int = 0
    shortest: int = 0


def draft_size(width: int, height: int, need: Need) -> tuple[int, int]:
    """The smallest size of this aspect that meets `need`, or the original size."""
    s = min(1.0, max(need.longest / max(width, height), need.shortest / min(width, height)))
    return max(1, math.ceil(width * s)), max(1, math.ceil(height * s))


def decode(
    data: bytes,
    max_pixels: int,
    background: tuple[int, int, int] = (255, 255, 255),
    need: Need | None = None,
) -> Decoded:
    """Decode an encoded image to 8-bit RGB, upright, first frame, transparency composited.

    `need`: how large the caller needs the image; JPEGs may be decoded at a scale that keeps that.
    None decodes at full size.
    Raises InvalidImage (empty, corrupt, truncated), UnsupportedMedia (not an image we read) or
    ImageTooLarge (more than `max_pixels`, checked from the header before decoding, or a PNG's text past
    PNG_TEXT_BYTES).
    """
    img = open_image(data, max_pixels)
    width, height = img.size
    try:
        drafted = draft(img, need)
        img.seek(0)  # animated: the first frame
        if img.getexif().get(ORIENTATION, 1) != 1:  # exif_transpose copies even an upright image
            img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img, background)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise InvalidImage(f"corrupt or truncated {img.format} image: {e}") from None
    if rgb.size != drafted and rgb.size == drafted[::-1]:  # EXIF turned it by 90 degrees
        width, height = height, width
    return Decoded(rgb, width, height)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header, read: its format and size, nothing decoded. Raises as `decode` does."""
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
        if "text chunk" in str(e) or "MAX_TEXT_CHUNK" in str(e):  # Pillow's words for PNG_TEXT_BYTES and its own cap
            raise ImageTooLarge(
                f"the PNG's text chunks (metadata) inflate to more than the limit of {PNG_TEXT_BYTES:,} bytes "
                "(1 MB a chunk): strip its metadata"
            ) from None
        raise InvalidImage(f"corrupt image header: {e}") from None
    if img.width * img.height > max_pixels:
        raise ImageTooLarge(f"image has {img.width}x{img.height} pixels, more than the limit of {max_pixels}")
    if img.width < 1 or img.height < 1:
        raise InvalidImage("image has no pixels")
    # Counting costs 0.8 ms a MB; a baseline JPEG's scans each hold their part of the image, so only a
    # progressive one can repeat a few bytes into many passes.
    if img.format == "JPEG" and img.info.get("progressive") and (scans := data.count(SOS)) > JPEG_MAX_SCANS:
        raise ImageTooLarge(f"JPEG has {scans} scans, more than the limit of {JPEG_MAX_SCANS}")
    return img


def draft(img: Image.Image, need: Need | None) -> tuple[int, int]:
    """Sets a JPEG to decode at the smallest DCT scale that meets `need`; the size it will decode at."""
    if need is not None and img.format == "JPEG" and img.mode in ("RGB", "L"):
        img.draft(img.mode, draft_size(img.width, img.height, need))
    return img.size


def pixels_to_decode(data: bytes, max_pixels: int, need: Need | None = None) -> int:
    """How many pixels `decode(data, max_pixels, need=need)` decodes, from the header alone. A progressive
    JPEG counts at full size: each of its scans is decoded over the whole image, whatever the DCT scale."""
    img = open_image(data, max_pixels)
    if img.info.get("progressive"):
        return img.width * img.height
    try:
        width, height = draft(img, need)
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidImage(f"corrupt or truncated {img.format} image: {e}") from None
    return width * height


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
    if img.mode != "RGB":
        return img.convert("RGB")
    img.load()
    return img
