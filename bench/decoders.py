"""Other decoders than Pillow's, on the inputs /v1/predict decodes (not a test).

    .venv/bin/python -m bench.decoders          # prints a markdown table

Pillow decodes JPEGs with libjpeg-turbo at a reduced scale (draft mode), and PNGs through the system's
zlib. The candidates: simplejpeg (libjpeg-turbo's TurboJPEG API, the engine PyTurboJPEG also wraps) for
JPEGs, and imagecodecs' libpng for PNGs. Each decodes to the same pixels as the service (checked before
it is timed), and the two take turns, so a noisy neighbour slows both alike. Figures are CPU time of one
decode in this process. The last column bounds what a faster resize (pillow-simd) could gain: the
letterbox resize's share of bytes-to-tensor (`service.pipeline.prepare`). A last line bounds what a
faster zlib could gain on PNGs: the PNG's pixel data inflated by the system's zlib and by zlib-ng.
"""

from __future__ import annotations

import argparse
import io
import statistics
import struct
import time
import zlib
from collections.abc import Callable
from importlib.resources import files

import imagecodecs
import numpy as np
import simplejpeg
from PIL import Image, features

from bench.server import ROOT, jpegs_of
from service.config import Settings
from service.decode import Need, decode
from service.pipeline import need_for, prepare
from service.preprocess import letterbox_box

MAX_PIXELS = 40_000_000


def inputs() -> dict[str, bytes]:
    """make bench's JPEG sizes (scikit-learn's photo, resized) and the README's PNG."""
    photo = Image.open(io.BytesIO((files("sklearn.datasets") / "images" / "china.jpg").read_bytes())).convert("RGB")
    out = {f"{side}x{side * 3 // 4} JPEG": data for side, data in jpegs_of(photo).items()}
    out["digit.png (640x400 PNG)"] = (ROOT / "docs/digit.png").read_bytes()
    return out


def pillow(data: bytes, need: Need) -> Image.Image:
    return decode(data, MAX_PIXELS, need=need).image


def candidate(data: bytes, size: tuple[int, int]) -> Callable[[], Image.Image]:
    """The other library's decode of `data` to `size` (W, H), as the PIL image the service's later steps
    take: the smallest DCT scale that covers it, for a JPEG (as Pillow's draft mode picks); full size for
    a PNG. EXIF orientation, which the service also reads, is left out: it would cost the candidate more."""
    if data[:3] == b"\xff\xd8\xff":
        w, h = size
        return lambda: Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=w, min_height=h))
    return lambda: Image.fromarray(imagecodecs.png_decode(data))


def cpu_ms(fn: Callable[[], object], seconds: float) -> float:
    fn()
    calls, started = 0, time.process_time()
    while (spent := time.process_time() - started) < seconds or calls < 3:
        fn()
        calls += 1
    return spent / calls * 1e3


def measure(name: str, data: bytes, need: Need, seconds: float, rounds: int) -> dict:
    ours = np.asarray(pillow(data, need))
    other = candidate(data, (ours.shape[1], ours.shape[0]))
    theirs = np.asarray(other())
    if theirs.shape != ours.shape or not np.array_equal(theirs, ours):
        raise AssertionError(f"{name}: the candidate decodes other pixels ({theirs.shape} vs {ours.shape})")
    turns: dict[str, list[float]] = {"pillow": [], "other": []}
    for _ in range(rounds):
        turns["pillow"].append(cpu_ms(lambda: pillow(data, need), seconds / rounds / 2))
        turns["other"].append(cpu_ms(other, seconds / rounds / 2))
    pillow_ms, other_ms = (statistics.median(v) for v in turns.values())
    return {"input": name, "decoded": f"{ours.shape[1]}x{ours.shape[0]}", "pillow_ms": pillow_ms, "other_ms": other_ms}


def idat(png: bytes) -> bytes:
    """A PNG's pixel data: its IDAT chunks' payloads, one zlib stream."""
    parts, at = [], 8  # past the signature
    while at + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[at : at + 8])
        if kind == b"IDAT":
            parts.append(png[at + 8 : at + 8 + length])
        at += 12 + length  # length, type, data, CRC
    return b"".join(parts)


def inflate(png: bytes, seconds: float, rounds: int) -> dict:
    """CPU ms to inflate a PNG's pixel data with the system's zlib (which Pillow links) and with zlib-ng."""
    stream = idat(png)
    if imagecodecs.zlibng_decode(stream) != zlib.decompress(stream):
        raise AssertionError("zlib-ng inflates the PNG's pixel data to other bytes")
    turns: dict[str, list[float]] = {"zlib": [], "zlib-ng": []}
    for _ in range(rounds):
        turns["zlib"].append(cpu_ms(lambda: zlib.decompress(stream), seconds / rounds / 2))
        turns["zlib-ng"].append(cpu_ms(lambda: imagecodecs.zlibng_decode(stream), seconds / rounds / 2))
    return {"bytes": len(stream), **{k: statistics.median(v) for k, v in turns.items()}}


def resize_share(data: bytes, size: tuple[int, int], settings: Settings, seconds: float) -> float:
    """The letterbox resize's share of `prepare` (decode, letterbox, to float), in CPU time."""
    img, _, geometry = prepare(data, 0, size, settings)
    x0, y0, x1, y1 = letterbox_box(geometry.width, geometry.height, size, settings.RESIZE)
    whole = cpu_ms(lambda: prepare(data, 0, size, settings), seconds / 2)
    resize = cpu_ms(lambda: img.resize((x1 - x0, y1 - y0), Image.BILINEAR, reducing_gap=3.0), seconds / 2)
    return resize / whole


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=2.0, help="per input and scale")
    p.add_argument("--rounds", type=int, default=6)
    a = p.parse_args(argv)
    if not a.seconds > 0 or a.rounds < 1:
        p.error("--seconds must be positive and --rounds at least 1")
    settings = Settings()
    size = (48, 48)  # the default model's input
    print(f"simplejpeg {simplejpeg.__version__}, imagecodecs {imagecodecs.__version__}, Pillow {Image.__version__}")
    print("\n| input | decoded at | scale for | Pillow, CPU ms | other, CPU ms | Pillow / other | resize share |")
    print("|---|---|---|---|---|---|---|")
    for name, data in inputs().items():
        scales = [("the model", need_for(0, size, settings))]
        if data[:3] == b"\xff\xd8\xff":
            scales.append(("a 1024 px overlay", need_for(settings.STORE_IMAGE_MAX_SIZE, size, settings)))
        share = resize_share(data, size, settings, a.seconds / 2)
        for label, need in scales:
            r = measure(name, data, need, a.seconds, a.rounds)
            print(
                f"| {name} | {r['decoded']} | {label} | {r['pillow_ms']:.2f} | {r['other_ms']:.2f} | "
                f"{r['pillow_ms'] / r['other_ms']:.2f}x | {share:.1%} |"
            )
    png = inputs()["digit.png (640x400 PNG)"]
    z = inflate(png, a.seconds, a.rounds)
    print(
        f"\ndigit.png's pixel data ({z['bytes'] / 1e3:.0f} kB of deflate) inflated: zlib {zlib.ZLIB_RUNTIME_VERSION} "
        f"(Pillow's: {features.version('zlib')}) {z['zlib']:.2f} ms, zlib-ng {z['zlib-ng']:.2f} ms: "
        f"{z['zlib'] / z['zlib-ng']:.2f}x; decoding all of it with Pillow takes the table's figure"
    )


if __name__ == "__main__":
    main()
