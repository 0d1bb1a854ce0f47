"""Candidates for the one-host prediction store, measured as the service uses one (not a test).

    .venv/bin/python -m bench.store        # prints a markdown table

The candidates: the service's disk store (LMDB, `service.store.DiskStore`), the diskcache store it
replaced (`DiskcacheStore` below, as the service ran it), and Redis as a local server (the
several-hosts store), for reference. Each of 2 processes (one per core here) puts a realistic
prediction (a 1024x683 photo plus the default model's maps, about 2.1 MB serialized) and reads back one
the other process stored, for `--seconds`. Reported: puts+gets per second over both processes, and
p50/p99 of one put+get.

    .venv/bin/python -m bench.store --full  # the disk stores as they run in the service, once full

`--full` measures both disk stores where they spend their life under load: full (at the service's
default bounds, 1,000 entries or 512 MiB), so that every put also evicts the oldest entry. 2 processes
fill one store in /dev/shm, then each puts `--puts` entries through the store's writer thread; reported
is the CPU time of one put, for the two kinds of entry the service stores: a JPEG upload as sent
(scikit-learn's 640x427 photo, 192 KB) and decoded pixels (the 1024x683 sample above). A third row
sends the puts through the store writer's process, as `python -m service` with several workers does,
and adds that process's CPU.

    .venv/bin/python -m bench.store --busy 1  # a worker's writes while another worker is busy

`--busy N`: N workers whose main thread runs Python without pause (an event loop under load) and one idle
worker, each putting the photo upload every 2 ms through its writer thread, into one full store:
each writing itself, then through the store writer's process (WARN_STORE_WRITER). Reported: puts a
second and put latency, for the idle worker and the busy ones. Written by the workers themselves, the
idle worker waits on LMDB's lock while a busy one holds it waiting for its own GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import multiprocessing as mp
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
from starlette.concurrency import run_in_threadpool

from service import threads
from service.config import Settings
from service.store import DiskStore, RedisStore, StoredPrediction, new_key


def sample() -> StoredPrediction:
    rng = np.random.default_rng(0)
    return StoredPrediction(
        result={"top_k": [{"label": "5", "index": 5, "probability": 0.99}]},
        masks=[rng.random((4, s, s), dtype=np.float32) for s in (48, 24, 12)],
        maps=[rng.random((s, s), dtype=np.float32) for s in (48, 24, 12)],
        combined=rng.random((12, 12), dtype=np.float32),
        content=(0, 9, 48, 39),
        image=rng.integers(0, 255, (683, 1024, 3), dtype=np.uint8),
    )


class Pieces(io.RawIOBase):
    """A read-only stream over buffers (read as flat bytes), without joining them into one."""

    def __init__(self, parts: list[bytes | memoryview]) -> None:
        self._parts = [memoryview(p).cast("B") for p in parts]

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes | memoryview:  # a view: no copy
        while self._parts and not len(self._parts[0]):
            self._parts.pop(0)
        if not self._parts:
            return b""
        part = self._parts[0]
        n = len(part) if size is None or size < 0 else min(size, len(part))
        self._parts[0] = part[n:]
        return part[:n]


class DiskcacheStore:
    """The disk store before LMDB, as the service ran it (8 shards): diskcache in `directory`, safe across
    processes, least recently stored evicted first past `max_bytes` (diskcache's size limit) or
    `max_items`, each entry expiring after `ttl_s`. SQLite takes one writer at a time and polls a taken
    lock with sleeps, so entries were spread by id over `shards` databases, each bounded by its share."""

    unavailable: tuple[type[Exception], ...] = ()

    def __init__(self, directory: Path, max_items: int, ttl_s: float, max_bytes: int, shards: int = 8) -> None:
        import diskcache

        self.directory = Path(directory)
        self.max_items = max_items // shards  # per shard, so never more than max_items in all
        self.ttl_s = ttl_s
        self.shards = [
            diskcache.Cache(
                str(self.directory / f"shard-{i}"),
                size_limit=max_bytes // shards,
                eviction_policy="least-recently-stored",
                cull_limit=16,  # entries evicted per write at most, so one write never stalls on a purge
                statistics=False,
            )
            for i in range(shards)
        ]
        self._writer = threads.pool(1, "store-writer")

    def shard(self, key: str):
        return self.shards[zlib.crc32(key.encode()) % len(self.shards)]

    def _put(self, key: str, value: StoredPrediction) -> None:
        cache = self.shard(key)
        # as a reader: diskcache then writes each piece as it comes (given bytes, it writes them line by line)
        cache.set(key, Pieces(value.parts()), read=True, expire=self.ttl_s)
        excess = len(cache) - self.max_items
        if excess > 0:
            # ids are UUIDv7 (`new_key`), so key order is age order: the oldest come from the key index,
            # without reading their values back as peekitem would
            for oldest in list(itertools.islice(cache.iterkeys(), min(excess, 16))):
                cache.delete(oldest)

    def _get(self, key: str) -> StoredPrediction | None:
        data = self.shard(key).get(key)
        return None if data is None else StoredPrediction.from_bytes(data)

    async def put(self, key: str, value: StoredPrediction) -> None:
        await asyncio.get_running_loop().run_in_executor(self._writer, self._put, key, value)

    async def get(self, key: str) -> StoredPrediction | None:
        return await run_in_threadpool(self._get, key)

    async def close(self) -> None:
        self._writer.shutdown(wait=False)
        for cache in self.shards:
            cache.close()


DISK_STORES = {"lmdb (the service's)": DiskStore, "diskcache (before)": DiskcacheStore}
RELAYED = "lmdb through the store writer (the service's, several workers)"


def make(kind: str, where: str):
    """A store bounded as the service's defaults bound it (1,000 entries, 512 MiB, an hour)."""
    s = Settings()
    if kind == RELAYED:  # the store writer's address is in the environment
        return DiskStore(Path(where), s.STORE_MAX_ITEMS, s.STORE_TTL_S, s.STORE_MAX_BYTES)
    if kind in DISK_STORES:
        alone = {"relay": False} if DISK_STORES[kind] is DiskStore else {}  # each process writes itself
        return DISK_STORES[kind](Path(where), s.STORE_MAX_ITEMS, s.STORE_TTL_S, s.STORE_MAX_BYTES, **alone)
    return RedisStore(where, 1000, 3600, prefix=f"bench-{uuid.uuid4().hex[:6]}:")


def worker(kind: str, where: str, seconds: float, out) -> None:
    async def main():
        store, value, keys, lat = make(kind, where), sample(), [], []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            key = new_key()  # as the service makes them: the disk stores evict in their order
            await store.put(key, value)
            got = await store.get(keys[-1] if keys else key)
            assert got is not None
            keys.append(key)
            lat.append(time.perf_counter() - t)
        await store.close()
        return lat

    out.put(asyncio.run(main()))


def measure(kind: str, where: str, seconds: float, procs: int = 2) -> dict:
    q = mp.get_context("spawn").Queue()
    ps = [mp.get_context("spawn").Process(target=worker, args=(kind, where, seconds, q)) for _ in range(procs)]
    for p in ps:
        p.start()
    lat = np.concatenate([q.get() for _ in ps]) * 1e3
    for p in ps:
        p.join()
    p50, p99 = np.percentile(lat, [50, 99])
    return {"store": kind, "ops_s": len(lat) / seconds, "p50_ms": p50, "p99_ms": p99}


def full_worker(directory: str, store_kind: str, entry: str, puts: int, out) -> None:
    from service.memory import return_freed_memory

    return_freed_memory()  # as the service runs
    value = sample()
    if entry == "upload":
        from importlib.resources import files

        value.image = (files("sklearn.datasets") / "images" / "china.jpg").read_bytes()
    store = make(store_kind, directory)

    async def put(n: int) -> None:  # as the service stores: through the store's writer thread
        for _ in range(n):
            await store.put(new_key(), value)

    asyncio.run(put(600))  # with the other process: past the 1,000 (or 512 MiB) kept, so each put below evicts
    cpu = time.process_time()
    asyncio.run(put(puts))
    out.put((time.process_time() - cpu) / puts * 1e3)


@contextlib.contextmanager
def scratch_store(relayed: bool):
    """A directory for a store, in /dev/shm where there is one, removed after; where `relayed`, with a store
    writer on it, whose address this process's environment holds meanwhile (for the workers it spawns)."""
    from service.store_writer import StoreWriter

    directory = tempfile.mkdtemp(prefix="warn-store-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    writer, saved = None, dict(os.environ)
    try:
        if relayed:
            os.environ["WARN_STORE_DIR"] = directory
            writer = StoreWriter()
            writer.start()
            os.environ.update(writer.env())
        yield directory, writer
    finally:
        if writer:
            writer.stop()
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(directory, ignore_errors=True)


def full(puts: int) -> list[dict]:
    """CPU per put; through the store writer, the workers' (timed puts) plus the writer's (its CPU over every
    put, the 600 per worker that fill the store included)."""
    from bench.server import cpu_seconds

    ctx = mp.get_context("spawn")
    rows = []
    for entry in ("upload", "pixels"):
        for store_kind in (*DISK_STORES, RELAYED):
            with scratch_store(store_kind == RELAYED) as (directory, writer):
                began = cpu_seconds(f"/proc/{writer.process.pid}/stat") if writer else 0.0
                q = ctx.Queue()
                ps = [ctx.Process(target=full_worker, args=(directory, store_kind, entry, puts, q)) for _ in range(2)]
                for p in ps:
                    p.start()
                cpu = [q.get(timeout=600) for _ in ps]
                for p in ps:
                    p.join()
                row = {"entry": entry, "store": store_kind, "cpu_ms": float(np.mean(cpu))}
                if writer:
                    spent = cpu_seconds(f"/proc/{writer.process.pid}/stat") - began
                    row["writer_ms"] = spent / (2 * (600 + puts)) * 1e3
                    row["cpu_ms"] += row["writer_ms"]
            rows.append(row)
    return rows


def busy_worker(directory: str, relay: bool, seconds: float, busy: bool, out) -> None:
    """A worker that puts the photo upload every 2 ms through its store's writer thread, the latency of each
    reported; `busy`: its main thread meanwhile runs Python, as an event loop under load does, holding the
    GIL but for the moments another thread asks for it."""
    from importlib.resources import files

    value = sample()
    value.image = (files("sklearn.datasets") / "images" / "china.jpg").read_bytes()
    store = DiskStore(directory, 1000, 3600, 512 << 20, relay=relay)
    for _ in range(600):  # with the other processes: past the 1,000 kept, so each put below evicts
        store._put(new_key(), value)
    stop = time.perf_counter() + seconds
    latencies: list[float] = []

    def putter() -> None:
        while time.perf_counter() < stop:
            began = time.perf_counter()
            store._put(new_key(), value)
            latencies.append(time.perf_counter() - began)
            time.sleep(0.002)

    thread = threading.Thread(target=putter)
    thread.start()
    while busy and time.perf_counter() < stop:
        pass
    thread.join()
    out.put((busy, latencies))


def busy(seconds: float, procs: int) -> list[dict]:
    """`procs` busy workers and one idle one putting at once into one store in /dev/shm, each writing
    itself, then through the store writer's process (WARN_STORE_WRITER): how long the idle worker's puts
    take, and the busy ones'."""
    ctx = mp.get_context("spawn")
    rows = []
    for relay in (False, True):
        with scratch_store(relay) as (directory, _):
            q = ctx.Queue()
            ps = [ctx.Process(target=busy_worker, args=(directory, relay, seconds, i > 0, q)) for i in range(procs + 1)]
            for p in ps:
                p.start()
            got = [q.get(timeout=600) for _ in ps]
            for p in ps:
                p.join()
        for who in (False, True):
            latencies = np.concatenate([lat for b, lat in got if b == who]) * 1e3
            rows.append(
                {
                    "writes": "through the store writer" if relay else "each worker itself",
                    "worker": "busy" if who else "idle",
                    "puts_s": len(latencies) / seconds,
                    "p50_ms": float(np.percentile(latencies, 50)),
                    "p99_ms": float(np.percentile(latencies, 99)),
                    "max_ms": float(latencies.max()),
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--full", action="store_true", help="the service's disk store, full: CPU per put")
    ap.add_argument("--puts", type=int, default=600, help="with --full: puts per process, timed")
    ap.add_argument(
        "--busy", type=int, metavar="PROCESSES", help="busy workers' put latency, with and without the store writer"
    )
    a = ap.parse_args()
    if a.puts < 1:
        ap.error("--puts must be at least 1")
    if a.busy:
        print("| writes | worker | puts/s | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|")
        for r in busy(a.seconds, a.busy):
            print(
                f"| {r['writes']} | {r['worker']} | {r['puts_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
                f"| {r['max_ms']:.1f} |"
            )
        return
    if a.full:
        print("| entry | store | CPU ms per put, full store (2 processes) |\n|---|---|---|")
        for r in full(a.puts):
            writer = f" (the store writer's {r['writer_ms']:.3f})" if "writer_ms" in r else ""
            print(f"| {r['entry']} | {r['store']} | {r['cpu_ms']:.3f}{writer} |")
        return
    rows, tmp = [], Path(tempfile.mkdtemp(prefix="warn-store-bench-"))
    try:
        for i, kind in enumerate(DISK_STORES):
            rows.append(measure(kind, str(tmp / str(i)), a.seconds))
        redis = shutil.which("redis-server")
        if redis:
            args = [redis, "--port", "6399", "--save", "", "--appendonly", "no"]
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
            time.sleep(0.5)
            try:
                rows.append(measure("redis (local server)", "redis://127.0.0.1:6399/0", a.seconds))
            finally:
                proc.terminate()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("| store | put+get per second (2 processes) | p50 ms | p99 ms |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['store']} | {r['ops_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")


if __name__ == "__main__":
    main()
