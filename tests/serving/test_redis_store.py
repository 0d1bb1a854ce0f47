"""The Redis prediction store, against a real redis-server: shared between replicas, surviving restarts."""

import asyncio
import shutil
import signal
import subprocess
import time

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from service.store import RedisStore, StoredPrediction
from tests.serving.conftest import Server, free_port, png


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait(10)


def start_redis(directory) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is missing: `make test` installs it (Debian package redis-server)"
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return proc, url


def sample(i: int) -> StoredPrediction:
    return StoredPrediction(
        result={"top_k": [{"label": str(i)}]},
        masks=[np.full((2, 4, 4), i, np.float32)],
        maps=[np.full((4, 4), i / 16, np.float32)],
        combined=np.full((4, 4), i / 16, np.float32),
        content=(0, 1, 4, 3),
        image=np.full((3, 5, 3), i, np.uint8),
    )


def test_round_trip_ttl_and_count(redis_url):
    async def main():
        store = RedisStore(redis_url, max_items=3, ttl_s=0.5, prefix="t1:")
        for i in range(5):
            await store.put(f"k{i}", sample(i))
        got = await store.get("k4")
        assert got.result == {"top_k": [{"label": "4"}]} and got.content == (0, 1, 4, 3)
        np.testing.assert_array_equal(got.masks[0], sample(4).masks[0])
        np.testing.assert_array_equal(got.maps[0], sample(4).maps[0])
        np.testing.assert_array_equal(got.combined, sample(4).combined)
        np.testing.assert_array_equal(got.image, sample(4).image)
        assert await store.get("k0") is None and await store.get("k1") is None  # trimmed past 3
        assert await store.get("k2") is not None
        await asyncio.sleep(0.7)
        assert await store.get("k4") is None  # expired
        assert await store.get("never") is None
        await store.close()

    asyncio.run(main())


def test_a_replica_restart_keeps_the_overlays(model_path, redis_url):
    env = {"WARN_MODEL_PATH": str(model_path), "WARN_STORE": "redis", "WARN_REDIS_URL": redis_url}
    image = png(Image.new("RGB", (64, 48), (30, 160, 90)))
    first = Server(env)
    try:
        first.wait_ready()
        body = httpx.post(f"{first.url}/v1/predict", content=image, headers={"content-type": "image/png"}).json()
        before = httpx.get(f"{first.url}/v1/predictions/{body['id']}/attention/combined.png").content
    finally:
        first.stop()
    second = Server(env)  # another replica, or the same one restarted
    try:
        second.wait_ready()
        stored = httpx.get(f"{second.url}/v1/predictions/{body['id']}")
        assert stored.status_code == 200 and stored.json()["top_k"] == body["top_k"]
        path = body["attention_urls"]["combined"].split(first.url, 1)[1]
        after = httpx.get(second.url + path)
        assert after.status_code == 200 and after.content == before
    finally:
        second.stop()


def test_an_unreachable_redis_stops_startup(model_path):
    s = Server(
        {
            "WARN_MODEL_PATH": str(model_path),
            "WARN_STORE": "redis",
            "WARN_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        }
    )
    try:
        assert s.proc.wait(60) != 0
        assert "cannot reach the Redis store" in s.output()
    finally:
        s.stop()


def test_a_hung_redis_costs_the_overlay_urls_not_the_predictions(model_path, tmp_path):
    """A Redis that stops answering (stopped here with SIGSTOP) held every answer past
    WARN_STORE_PENDING_WRITES waiting for its write: 161 req/s fell to 2.4. A write now fails after
    WARN_STORE_TIMEOUT_S, the predictions after it come without overlay URLs, saying why, and a GET of a
    stored one is a 503 that clients may retry."""
    proc, url = start_redis(tmp_path)
    env = {
        "WARN_MODEL_PATH": str(model_path),
        "WARN_STORE": "redis",
        "WARN_REDIS_URL": url,
        "WARN_STORE_TIMEOUT_S": "0.5",
        "WARN_STORE_PENDING_WRITES": "2",
    }
    image = png(Image.new("RGB", (64, 48), (30, 160, 90)))
    s = Server(env)
    try:
        s.wait_ready()

        def post() -> httpx.Response:
            return httpx.post(f"{s.url}/v1/predict", content=image, headers={"content-type": "image/png"}, timeout=30)

        kept = post().json()
        overlay = kept["attention_urls"]["combined"]
        assert httpx.get(overlay).status_code == 200
        proc.send_signal(signal.SIGSTOP)
        answers = [post() for _ in range(8)]
        assert all(a.status_code == 200 and a.json()["top_k"] for a in answers)
        unkept = [a.json() for a in answers if a.json()["attention_urls"] is None]
        assert len(unkept) >= 5 and answers[-1].json()["attention_urls"] is None
        assert "WARN_STORE_TIMEOUT_S" in unkept[0]["warnings"][0]
        got = httpx.get(overlay, timeout=30)
        assert got.status_code == 503 and got.json()["code"] == "store_unavailable"
        assert got.headers["retry-after"] == "5"
        assert httpx.get(f"{s.url}/v2/health/ready").status_code == 200  # the model still serves
    finally:
        proc.send_signal(signal.SIGCONT)
        s.stop()
        proc.terminate()
        proc.wait(10)
