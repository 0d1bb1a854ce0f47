"""The README's example: a test-split digit on a 640x400 cluttered canvas, and the default model's overlays.

    make figure      # writes docs/digit.png and docs/overlay-example.png, prints the prediction

It goes through the service (in process) exactly as a dashboard would: POST the image, then fetch
the overlay URLs from the answer.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from models.data import ClutterSpec, _fragment, _scans, split_scans
from service.config import Settings
from service.main import create_app

OUT = Path(__file__).with_name("overlay-example.png")
INPUT = Path(__file__).with_name("digit.png")  # the input alone, for the README's curl examples


def canvas(seed: int = 7) -> tuple[bytes, int, tuple[int, int, int, int]]:
    """A 640x400 canvas with one test digit and clutter at the same scale; its label and box."""
    rng = np.random.default_rng(seed)
    scans, labels = _scans()
    split = split_scans(len(scans), 0, ClutterSpec().test_fraction)["test"]
    sid = split[rng.integers(len(split))]
    w, h, side = 640, 400, 170
    img = np.full((h, w, 3), (30, 24, 48), np.float32) + rng.normal(0, 10, (h, w, 3))

    def stamp(alpha: np.ndarray, x: int, y: int, rgb: tuple[int, int, int]) -> None:
        region = img[y : y + side, x : x + side]
        region[:] = region * (1 - alpha[..., None]) + np.array(rgb) * alpha[..., None]

    for x, y in ((40, 30), (250, 200), (470, 40), (60, 220)):
        frag = _fragment(scans[split[rng.integers(len(split))]], rng, 16)
        stamp(np.asarray(Image.fromarray(frag, "F").resize((side, side))).clip(0, 1), x, y, (120, 200, 230))
    x, y = 420, 215
    stamp(np.asarray(Image.fromarray(scans[sid], "F").resize((side, side))).clip(0, 1), x, y, (240, 200, 80))
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue(), int(labels[sid]), (x, y, x + side, y + side)


def main() -> None:
    data, label, box = canvas()
    INPUT.write_bytes(data)
    with TestClient(create_app(Settings())) as c:
        body = c.post("/v1/predict", content=data, headers={"content-type": "image/png"}).json()
        urls = body["attention_urls"]
        tiles = {
            name: Image.open(io.BytesIO(c.get(url, params={"max_size": 320}).content)) for name, url in urls.items()
        }
    photo = Image.open(io.BytesIO(data)).resize((320, 200))
    ImageDraw.Draw(photo).rectangle([v // 2 for v in box], outline=(255, 80, 80), width=2)
    order = [("input (true box in red)", photo), ("combined", tiles["combined"])]
    order += [(f"layer {n}", tiles[n]) for n in sorted(k for k in tiles if k != "combined")]
    sheet = Image.new("RGB", (320 * 3 + 20, 200 * 2 + 50), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (title, tile) in enumerate(order[:6]):
        x, y = 5 + (i % 3) * 325, 5 + (i // 3) * 225
        sheet.paste(tile, (x, y + 18))
        draw.text((x, y + 2), title, fill=(0, 0, 0))
    sheet.save(OUT)
    top = body["top_k"][0]
    print(json.dumps({"true_label": label, "predicted": top, "global_gates": body["global_gates"]}, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
