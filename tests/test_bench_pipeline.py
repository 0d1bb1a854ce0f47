"""bench.pipeline, the ceiling without HTTP: several images measured by one set of processes."""

import io

import numpy as np
import pytest
from PIL import Image

from bench import pipeline
from service.config import DEFAULT_MODEL, cores


def png(width: int, height: int) -> bytes:
    ramp = np.linspace(0, 255, width * height * 3).astype(np.uint8).reshape(height, width, 3)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    return buf.getvalue()


def test_each_image_gets_its_own_figures_from_the_same_processes():
    images = {"small": png(32, 32), "large": png(2400, 1600)}
    got = pipeline.measure_images(DEFAULT_MODEL, images, 0.5)
    assert set(got) == {"small", "large"}
    for r in got.values():
        assert r["img_s"] > 0 and r["single_p50_ms"] > 0 and r["processes"] == cores()
    # decoding 3.8 million pixels, against a thousand: figures kept apart by image, not mixed
    assert got["large"]["single_p50_ms"] > 2 * got["small"]["single_p50_ms"]
    assert got["small"]["img_s"] > 2 * got["large"]["img_s"]


def test_a_process_that_dies_fails_the_measure_instead_of_hanging_it(tmp_path):
    with pytest.raises(RuntimeError, match="exited with code 1"):
        pipeline.measure_images(tmp_path / "missing.onnx", {"small": png(32, 32)}, 0.5)
