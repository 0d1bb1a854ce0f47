"""bench.loop, the event loop's CPU per /v1/predict, layer by layer."""

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from bench import loop
from service.config import Settings


def measure(image: bytes, ctype: str, requests: int = 5) -> dict[str, list[float]]:
    return asyncio.run(loop.measure(image, ctype, requests, Settings(GRPC_PORT=0, STORE="memory")))


def test_every_layer_is_timed_on_the_same_requests():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    cpu = measure(buf.getvalue(), "image/png")
    assert list(cpu) == list(loop.LAYERS)
    assert all(len(times) == 5 and all(t >= 0 for t in times) for times in cpu.values())
    # the whole stack does all the first layer does and more (about 4x its loop CPU here)
    assert sum(cpu[loop.LAYERS[-1]]) > sum(cpu[loop.LAYERS[0]])
    table = loop.table(cpu)
    assert table.count("\n") == len(loop.LAYERS) + 1 and "+" in table.splitlines()[-1]


@pytest.mark.parametrize("upload", [b"not an image", b""])  # empty: one empty read, as uvicorn sends it
def test_a_refused_upload_stops_the_measure_instead_of_timing_the_error(upload):
    with pytest.raises(SystemExit, match="HTTP 4"):
        measure(upload, "image/png", 1)
