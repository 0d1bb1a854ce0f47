"""Candidates for the one-host prediction store, measured as the service uses one (not a test).

    .venv/bin/python -m bench.store        # prints a markdown table

Each of 2 processes (one per core here) puts a realistic prediction (a 1024x683 photo plus the
default model's maps, about 2.1 MB serialized) and reads back one the other process stored, for
`--seconds`. Reported: puts+gets per second over both processes, and p50/p99 of one put+get.
Redis runs as a local server (the several-hosts store), for reference.

    .venv/bin/python -m bench.store --full  # the disk store as it runs in the service, once full

`--full` measures the service's DiskStore where it spends its life under load: full, so that every put
also evicts the oldest entry. 2 processes fill one store in /dev/shm, then each puts `--puts` entries;
reported is the CPU time of one put, for the two kinds of entry the service stores: a JPEG upload as
sent (scikit-learn's 640x427 photo, 192 KB) and decoded pixels (the 1024x683 sample above).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from service.store import DiskStore, RedisStore, StoredPrediction


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


class LmdbStore:
    """LMDB with a fixed map size; it has no TTL or eviction of its own (both would be ours to write)."""

    def __init__(self, directory: Path) -> None:
        import lmdb

        self.env = lmdb.open(str(directory), map_size=4 << 30, max_readers=64)

    async def put(self, key: str, value: StoredPrediction) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(key.encode(), value.to_bytes())

    async def get(self, key: str) -> StoredPrediction | None:
        with self.env.begin() as txn:
            data = txn.get(key.encode())
        return None if data is None else StoredPrediction.from_bytes(data)

    async def close(self) -> None:
        self.env.close()


def make(kind: str, where: str):
    if kind == "diskcache":
        return DiskStore(Path(where), 1000, 3600, 512 << 20)
    if kind == "lmdb":
        return LmdbStore(Path(where))
    return RedisStore(where, 1000, 3600, prefix=f"bench-{uuid.uuid4().hex[:6]}:")


def worker(kind: str, where: str, seconds: float, out) -> None:
    async def main():
        store, value, keys, lat = make(kind, where), sample(), [], []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            key = uuid.uuid4().hex
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


def full_worker(directory: str, kind: str, puts: int, out) -> None:
    from service.memory import return_freed_memory
    from service.store import new_key

    return_freed_memory()  # as the service runs
    value = sample()
    if kind == "upload":
        from importlib.resources import files

        value.image = (files("sklearn.datasets") / "images" / "china.jpg").read_bytes()
    store = DiskStore(Path(directory), 1000, 3600, 4 << 30, shards=8)

    async def put(n: int) -> None:  # as the service stores: through the store's writer thread
        for _ in range(n):
            await store.put(new_key(), value)

    asyncio.run(put(600))  # with the other process: past the 1,000 kept, so each put below evicts
    cpu = time.process_time()
    asyncio.run(put(puts))
    out.put((time.process_time() - cpu) / puts * 1e3)


def full(puts: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for kind in ("upload", "pixels"):
        directory = tempfile.mkdtemp(prefix="warn-store-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
        try:
            q = ctx.Queue()
            ps = [ctx.Process(target=full_worker, args=(directory, kind, puts, q)) for _ in range(2)]
            for p in ps:
                p.start()
            cpu = [q.get(timeout=600) for _ in ps]
            for p in ps:
                p.join()
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        rows.append({"entry": kind, "cpu_ms": float(np.mean(cpu))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--full", action="store_true", help="the service's disk store, full: CPU per put")
    ap.add_argument("--puts", type=int, default=600, help="with --full: puts per process, timed")
    a = ap.parse_args()
    if a.puts < 1:
        ap.error("--puts must be at least 1")
    if a.full:
        print("| entry | CPU ms per put, full store (2 processes) |\n|---|---|")
        for r in full(a.puts):
            print(f"| {r['entry']} | {r['cpu_ms']:.3f} |")
        return
    rows, tmp = [], Path(tempfile.mkdtemp(prefix="warn-store-bench-"))
    try:
        rows.append(measure("diskcache", str(tmp / "dc"), a.seconds))
        rows.append(measure("lmdb", str(tmp / "lmdb"), a.seconds))
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
