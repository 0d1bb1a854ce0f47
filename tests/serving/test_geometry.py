"""Overlays line up with the original pixels: the default model finds a digit on a large, non-square canvas."""

import io

import numpy as np
import pytest
from PIL import Image

from models.data import _scans, split_scans
from tests.serving.conftest import make_client, png

CANVAS = (640, 400)


def digit_canvas(scan: np.ndarray, x: int, y: int, side: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = CANVAS
    base = np.full((h, w, 3), (25, 30, 45), np.float32) + rng.normal(0, 12, (h, w, 3))
    ink = np.asarray(Image.fromarray(scan, "F").resize((side, side), Image.BILINEAR)).clip(0, 1)
    region = base[y : y + side, x : x + side]
    region[:] = region * (1 - ink[..., None]) + np.array([240, 220, 90]) * ink[..., None]
    return png(Image.fromarray(base.clip(0, 255).astype(np.uint8)))


def hottest(png_bytes: bytes) -> tuple[int, int]:
    """(x, y) of the brightest pixel of a viridis heatmap (viridis rises monotonically in lightness)."""
    grey = np.asarray(Image.open(io.BytesIO(png_bytes)).convert("L"), np.float32)
    y, x = np.unravel_index(grey.argmax(), grey.shape)
    return int(x), int(y)


@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
def test_attention_covers_the_digit(model_path, resize):
    scans, labels = _scans()
    test_ids = split_scans(len(scans), 0, 0.2)["test"]  # scans the default model never saw
    spots = [(60, 40), (420, 210), (250, 120), (450, 20), (100, 200), (330, 180)]
    side = 180  # about 13 pixels of the 48-pixel model input, as in training
    hits, correct = 0, 0
    with make_client(model_path) if resize == "letterbox" else make_client(model_path, RESIZE=resize) as c:
        for i, (x, y) in enumerate(spots):
            sid = test_ids[i * 7]
            body = c.post(
                "/v1/predict", content=digit_canvas(scans[sid], x, y, side, i), headers={"content-type": "image/png"}
            ).json()
            correct += body["top_k"][0]["index"] == labels[sid]
            heat = c.get(body["attention_urls"]["combined"], params={"mode": "heatmap"})
            assert Image.open(io.BytesIO(heat.content)).size == CANVAS
            hx, hy = hottest(heat.content)
            margin = 20  # pixels of the 640x400 canvas, about 1.5 pixels of the model input
            hits += x - margin <= hx < x + side + margin and y - margin <= hy < y + side + margin
    assert hits >= len(spots) - 1, f"hottest point on the digit for only {hits} of {len(spots)} canvases"
    if resize == "letterbox":  # stretching distorts the digit's shape; only where it looked is checked then
        assert correct >= len(spots) // 2
