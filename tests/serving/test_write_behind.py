"""Predictions are stored after their answer is sent, and their URLs still answer at once."""

import asyncio
import os
import threading
import time
import uuid

import anyio
import numpy as np
from PIL import Image

from service.store import DiskStore, Entropy, key_time, new_key
from tests.serving.conftest import make_client, png

IMAGE = png(Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 90, 3), dtype=np.uint8)))
PNG = {"content-type": "image/png"}


class GatedStore:
    """A store whose writes wait until the test opens the gate (and then fail, if told to)."""

    unavailable = ()

    def __init__(self, inner) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.fail = False
        self.refuse_reads = False
        self.gets = self.puts = 0

    async def put(self, key, value) -> None:
        self.puts += 1
        await anyio.to_thread.run_sync(self.gate.wait)
        if self.fail:
            raise ConnectionError("the store is down")
        await self.inner.put(key, value)

    async def get(self, key):
        self.gets += 1
        if self.refuse_reads:
            raise ConnectionError("the store is down")
        return await self.inner.get(key)

    async def close(self) -> None:
        await self.inner.close()


def gate(client) -> GatedStore:
    rt = client.app.state.runtime
    rt.store = GatedStore(rt.store)
    return rt.store


def open_later(store: GatedStore, seconds: float) -> None:
    threading.Timer(seconds, store.gate.set).start()


def test_ids_carry_their_creation_time():
    now = time.time()
    key = new_key(now)
    assert uuid.UUID(key).version == 7 and uuid.UUID(key).hex == key
    assert abs(key_time(key) - now) < 0.001
    assert len({new_key(now) for _ in range(1000)}) == 1000  # the random part differs within one millisecond
    for other in (uuid.uuid4().hex, "nope", key.upper(), key[:-1], key + "0", " " + key[1:]):
        assert key_time(other) is None


def test_the_answer_does_not_wait_for_the_store_and_its_urls_wait_for_the_write(model_path):
    with make_client(model_path, STORE_WRITE_WAIT_S=10) as c:
        store = gate(c)
        open_later(store, 10)  # only if the answer waited for its write, which fails below
        r = c.post("/v1/predict", content=IMAGE, headers=PNG)
        assert r.status_code == 200
        key = r.json()["id"]
        assert key in c.app.state.runtime.writes, "the answer waited for its store"
        open_later(store, 0.2)
        assert c.get(f"/v1/predictions/{key}").json()["top_k"] == r.json()["top_k"]
        assert c.get(r.json()["attention_urls"]["combined"]).status_code == 200
        assert not c.app.state.runtime.writes


def test_a_forked_process_never_draws_the_random_bytes_its_parent_draws():
    entropy = Entropy()
    entropy.take(10)  # a block is read
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next bytes, to the parent
        os.write(write, entropy.take(10))
        os._exit(0)
    os.waitpid(pid, 0)
    childs = os.read(read, 10)
    os.close(read)
    os.close(write)
    assert len(childs) == 10 and childs != entropy.take(10)


def test_another_worker_waits_for_a_young_id_but_not_for_an_old_one(model_path, tmp_path):
    shared = {"STORE": "disk", "STORE_DIR": tmp_path, "STORE_WRITE_WAIT_S": 10, "GRPC_PORT": 0}
    with make_client(model_path, **shared) as a, make_client(model_path, **shared) as b:
        store = gate(a)
        key = a.post("/v1/predict", content=IMAGE, headers=PNG).json()["id"]
        open_later(store, 0.3)
        assert b.get(f"/v1/predictions/{key}").status_code == 200  # written by `a` while `b` waited
        reader = gate(b)
        reader.gate.set()
        assert b.get(f"/v1/predictions/{new_key(time.time() - 60)}").status_code == 404
        assert b.get(f"/v1/predictions/{uuid.uuid4().hex}").status_code == 404
        assert b.get(f"/v1/predictions/{new_key(time.time() + 60)}").status_code == 404  # from the future
        assert reader.gets == 3, "an id that cannot be under way was looked up more than once"


def test_a_failed_store_keeps_the_answer_is_counted_and_not_waited_for(model_path):
    with make_client(model_path, STORE_WRITE_WAIT_S=10) as c:
        store = gate(c)
        store.fail = True
        r = c.post("/v1/predict", content=IMAGE, headers=PNG)
        assert r.status_code == 200
        open_later(store, 0.2)
        # this worker saw its own write fail: one lookup, no waiting for a write that will not come
        assert c.get(f"/v1/predictions/{r.json()['id']}").status_code == 404
        assert store.gets == 1
        metrics = c.get("/metrics").text
        assert "warn_store_write_failures_total 1.0" in metrics
        assert "warn_store_write_duration_seconds_count 0.0" in metrics  # a failure is not a write's time


def test_the_time_a_write_waited_for_the_store_is_measured(model_path):
    with make_client(model_path) as c:
        store = gate(c)
        r = c.post("/v1/predict", content=IMAGE, headers=PNG)  # answered; its write waits at the gate
        open_later(store, 0.3)
        assert c.get(f"/v1/predictions/{r.json()['id']}").status_code == 200  # waits for the write
        metrics = c.get("/metrics").text
    assert "warn_store_write_duration_seconds_count 1.0" in metrics
    assert 'warn_store_write_duration_seconds_bucket{le="0.25"} 0.0' in metrics  # it waited 0.3 s or more


def test_past_the_pending_limit_the_answer_waits_for_its_write(model_path):
    with make_client(model_path, STORE_PENDING_WRITES=0) as c:
        store = gate(c)
        open_later(store, 0.3)
        key = c.post("/v1/predict", content=IMAGE, headers=PNG).json()["id"]
        assert key not in c.app.state.runtime.writes
        assert c.portal.call(store.inner.get, key) is not None


def test_shutdown_finishes_the_writes_under_way(model_path, tmp_path):
    with make_client(model_path, STORE="disk", STORE_DIR=tmp_path, GRPC_PORT=0) as c:
        store = gate(c)
        key = c.post("/v1/predict", content=IMAGE, headers=PNG).json()["id"]
        assert key in c.app.state.runtime.writes
        open_later(store, 0.3)
    kept = DiskStore(tmp_path, 10, 60, 64 << 20)
    assert anyio.run(kept.get, key) is not None


def test_shutdown_does_not_wait_for_a_hung_store(model_path):
    with make_client(model_path, SHUTDOWN_TIMEOUT_S=0.2) as c:
        store = gate(c)
        open_later(store, 60)  # releases the hung write's thread if shutdown waited for it
        c.post("/v1/predict", content=IMAGE, headers=PNG)
        started = time.monotonic()
    try:
        assert time.monotonic() - started < 30, "shutdown waited for a store that never answered"
    finally:
        store.gate.set()


def test_a_failing_store_costs_the_overlay_urls_not_the_predictions(model_path, monkeypatch):
    """A store that fails: predictions are answered without URLs (saying why) instead of each trying,
    and after STORE_RETRY_S the store is tried again."""
    monkeypatch.setattr("service.pipeline.STORE_RETRY_S", 0.5)
    with make_client(model_path, STORE_PENDING_WRITES=0) as c:  # every answer waits for its own write
        store = gate(c)
        store.fail = True
        store.gate.set()
        for _ in range(3):
            r = c.post("/v1/predict", content=IMAGE, headers=PNG)
            assert r.status_code == 200 and r.json()["top_k"]
            assert r.json()["attention_urls"] is None and "not kept" in r.json()["warnings"][0]
        assert store.puts == 1  # the first found it down; the next two did not try
        time.sleep(0.6)
        store.fail = False
        r = c.post("/v1/predict", content=IMAGE, headers=PNG).json()
        assert "warnings" not in r
        assert c.get(r["attention_urls"]["combined"]).status_code == 200


class HungStore:
    """A store that never answers (a Redis that stopped responding)."""

    unavailable = ()

    async def put(self, key, value) -> None:
        await asyncio.Event().wait()

    async def get(self, key):
        await asyncio.Event().wait()

    async def close(self) -> None:
        pass


def test_a_hung_store_is_given_up_on_after_its_timeout(model_path):
    with make_client(model_path, STORE_PENDING_WRITES=0, STORE_TIMEOUT_S=0.3) as c:
        c.app.state.runtime.store = HungStore()
        started = time.monotonic()
        r = c.post("/v1/predict", content=IMAGE, headers=PNG)
        assert r.status_code == 200 and r.json()["attention_urls"] is None
        assert time.monotonic() - started < 20, "the answer waited for a store that never answered"
        key = r.json()["id"]
        got = c.get(f"/v1/predictions/{key}")
        assert got.status_code == 503 and got.json()["code"] == "store_unavailable"
        assert got.headers["retry-after"] == "5" and "did not answer" in got.json()["error"]


def test_a_store_that_refuses_reads_is_a_503_not_a_500(model_path):
    with make_client(model_path) as c:
        store = gate(c)
        store.gate.set()
        r = c.post("/v1/predict", content=IMAGE, headers=PNG).json()
        store.refuse_reads = True
        for url in (f"/v1/predictions/{r['id']}", r["attention_urls"]["combined"]):
            got = c.get(url)
            assert got.status_code == 503 and got.json()["code"] == "store_unavailable", got.text
            assert "ConnectionError" in got.json()["error"]
