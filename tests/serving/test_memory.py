"""A worker hands back the heap a burst of request bodies leaves behind, once it has gone quiet."""

import asyncio
import gc
import gzip
import json
import os
import platform
import threading

import pytest
from PIL import Image

from service.limits import BodyBudget
from service.memory import trim_heap
from tests.serving.conftest import ROOT, make_client, png


def test_the_heap_is_trimmed_once_the_worker_is_quiet_after_enough_bodies():
    trimmed = threading.Event()
    calls = []

    def trim():
        calls.append(threading.current_thread().name)
        trimmed.set()

    async def scenario() -> None:
        budget = BodyBudget(1000, trim, trim_after=50, quiet_s=0.05)
        budget.take(30)
        budget.give(30)
        assert budget.quiet is None  # 30 bytes: not worth a trim
        budget.take(30)
        budget.give(30)
        assert budget.quiet is not None  # 60 passed, none held: a trim once the worker stays quiet
        await asyncio.sleep(0.02)
        budget.take(10)  # a body came: not quiet after all
        assert budget.quiet is None
        await asyncio.sleep(0.1)
        assert not calls
        budget.give(10)
        await asyncio.sleep(0.1)
        assert await asyncio.to_thread(trimmed.wait, 5)
        budget.take(10)
        budget.give(10)
        assert budget.quiet is None and budget.since_trim == 10  # counting starts again

    asyncio.run(scenario())
    assert len(calls) == 1 and calls[0] != threading.main_thread().name  # off the event loop's thread


def test_no_trim_while_a_body_is_held():
    async def scenario() -> None:
        budget = BodyBudget(1000, lambda: pytest.fail("trimmed while a body was held"), trim_after=1, quiet_s=0.01)
        budget.take(100)
        budget.take(100)
        budget.give(100)
        await asyncio.sleep(0.05)
        assert budget.quiet is None and budget.held == 100

    asyncio.run(scenario())


def test_the_app_trims_with_glibc():
    from service.config import Settings
    from service.main import create_app

    assert create_app(Settings(GRPC_PORT=0)).state.body_budget.trim is trim_heap
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    assert trim_heap()


def binary_v2(images: list[bytes]) -> tuple[bytes, dict[str, str]]:
    raw = b"".join(len(i).to_bytes(4, "little") + i for i in images)
    spec = {"name": "image", "datatype": "BYTES", "shape": [len(images)], "parameters": {"binary_data_size": len(raw)}}
    head = json.dumps({"inputs": [spec]}).encode()
    return head + raw, {"inference-header-content-length": str(len(head)), "content-type": "application/octet-stream"}


def test_refusals_leave_no_garbage_holding_their_bodies(model_path):
    """Cycles through a refused request's frames wait for a full collection, rare in a worker (a gRPC
    refusal once held its 15 MiB message that way). Every kind of refusal here leaves its body to
    reference counting."""
    digit = (ROOT / "docs/digit.png").read_bytes()
    noise = os.urandom(300_000)
    huge = png(Image.new("L", (2100, 2000)))  # 4.2 MP, past the limit below
    v2 = "/v2/models/warn-cluttered-digits/infer"
    refusals = [
        ("/v1/predict", noise, {"content-type": "image/png"}, 415),
        ("/v1/predict", huge, {"content-type": "image/png"}, 413),
        ("/v1/predict", digit[:300_000], {"content-type": "image/png"}, 422),
        ("/v1/attention?layer=9", digit, {"content-type": "image/png"}, 400),
        (v2, *binary_v2([digit] * 3), 413),
        (v2, *binary_v2([noise]), 415),
        (
            v2,
            gzip.compress(b"{" + b" " * 20_000_000),
            {"content-type": "application/json", "content-encoding": "gzip"},
            413,
        ),
    ]
    with make_client(model_path, STORE="memory", MAX_IMAGES_PER_REQUEST=2, MAX_IMAGE_PIXELS=4_000_000) as c:
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for path, body, headers, status in refusals:
                assert c.post(path, content=body, headers=headers).status_code == status, path
            gc.collect()
            # bytes are not tracked by the collector: what refers to them is. httpx's own cycles, in the test
            # client, hold its copy of each request.
            held = [
                (type(o).__name__, len(r))
                for o in gc.garbage
                if not type(o).__module__.startswith("httpx")
                for r in gc.get_referents(o)
                if isinstance(r, (bytes, bytearray)) and len(r) > 100_000
            ]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert held == []
