"""The service's thread pools name their threads in the OS too, so `top -H`, `ps -L` and the benches can
tell a worker's decoding, inference and store threads from its event loop."""

import os
import sys
import time

import numpy as np
import pytest
from PIL import Image

from bench.server import cpu_by_thread
from service import threads
from tests.serving.conftest import make_client, png

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names in /proc: Linux")


def os_thread_names() -> set[str]:
    names = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            names.add(open(f"/proc/self/task/{tid}/comm").read().strip())
        except FileNotFoundError:
            pass
    return names


def test_a_prediction_runs_on_threads_named_for_their_stage(model_path):
    image = png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)))
    with make_client(model_path, STORE="disk") as c:
        r = c.post("/v1/predict", content=image, headers={"content-type": "image/png"})
        assert r.status_code == 200
        assert c.get(r.json()["attention_urls"]["combined"]).status_code == 200  # the write has finished
        assert {"decode_0", "store-writer_0"} <= os_thread_names()


def test_cpu_by_thread_counts_a_named_pool_apart_from_the_loop():
    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    with threads.pool(1, "burner") as p:
        p.submit(spin, 0.3).result()
        seen = cpu_by_thread(os.getpid())
    assert seen["burner"] >= 0.2 and "loop" in seen
