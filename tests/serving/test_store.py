"""Prediction stores: bounded by count, bytes and age, and the serialized form round-trips."""

import asyncio
import random
import time

import numpy as np

from service.store import DiskStore, MemoryStore, StoredPrediction


def keys(n: int) -> list[str]:
    """Prediction ids as `new_key` makes them, a millisecond apart, oldest first (a disk store evicts in
    id order); the same every run."""
    rng = random.Random(0)
    return [f"{0x019AC1D2E3F4 + i:012x}7{rng.getrandbits(12):03x}8{rng.getrandbits(60):015x}" for i in range(n)]


async def fill(store, ids: list[str], side: int = 8) -> None:
    """Put sample(i) under ids[i], oldest first."""
    for i, key in enumerate(ids):
        await store.put(key, sample(i, side=side))


async def kept(store, ids: list[str]) -> list[int]:
    """The indexes of the ids the store still holds."""
    return [i for i, key in enumerate(ids) if await store.get(key) is not None]


async def put_then_get(store, ids: list[str], entries: list[StoredPrediction]) -> list[StoredPrediction | None]:
    """Puts each entry under its id, then reads each back; closes the store."""
    for key, entry in zip(ids, entries):
        await store.put(key, entry)
    got = [await store.get(key) for key in ids]
    await store.close()
    return got


def sample(i: int, side: int = 8) -> StoredPrediction:
    return StoredPrediction(
        result={"top_k": [{"label": str(i)}]},
        masks=[np.full((2, 4, 4), i, np.float32), np.full((2, 2, 2), -i, np.float32)],
        maps=[np.full((4, 4), i / 16, np.float32), np.full((2, 2), i / 4, np.float32)],
        combined=np.full((2, 2), i / 4, np.float32),
        content=(0, 1, 4, 3),
        image=np.full((side, side + 1, 3), i % 256, np.uint8),
    )


def test_serialized_prediction_round_trips():
    s = sample(7, side=33)
    got = StoredPrediction.from_bytes(s.to_bytes())
    assert got.result == s.result and got.content == s.content
    for a, b in zip([*got.masks, *got.maps, got.combined, got.image], [*s.masks, *s.maps, s.combined, s.image]):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_a_decoded_image_is_stored_as_its_pixels():
    """The answer goes out before the pixels are copied: a prediction holds the decoded image, and the
    store serializes it as (H, W, 3) uint8, counting the same bytes either way."""
    import dataclasses

    from PIL import Image

    from service import overlay

    s = sample(9, side=33)
    decoded = dataclasses.replace(s, image=Image.fromarray(s.image))
    assert decoded.nbytes == s.nbytes
    got = StoredPrediction.from_bytes(decoded.to_bytes())
    np.testing.assert_array_equal(got.image, s.image)
    assert got.encoded is None and got.picture().size == (34, 33)
    params = overlay.OverlayParams(layer="0", max_size=16)
    assert overlay.draw(decoded, decoded.picture(), params, (4, 4)) == overlay.draw(got, got.picture(), params, (4, 4))


def test_an_upload_is_stored_as_sent():
    """/v1/predict keeps the upload, not its pixels: what the store holds and counts is the upload's bytes."""
    import dataclasses

    import pytest

    upload = b"\xff\xd8 any encoded image " * 100
    s = dataclasses.replace(sample(3, side=40), image=upload)
    assert s.nbytes == sample(3, side=40).nbytes - 3 * 40 * 41 + len(upload)
    got = StoredPrediction.from_bytes(s.to_bytes())
    assert got.encoded == upload and got.result == s.result and got.content == s.content
    for a, b in zip([*got.masks, *got.maps, got.combined], [*s.masks, *s.maps, s.combined]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="encoded"):
        got.picture()


def test_entries_of_the_previous_format_still_read():
    """Format 2 (a Redis store written before an upgrade): the image was the last raw array."""
    import json

    from service.store import MAGIC_PIXELS

    s = sample(5, side=9)
    arrays = [*s.masks, *s.maps, s.combined, s.image]
    head = json.dumps(
        {
            "result": s.result,
            "content": list(s.content),
            "layers": 2,
            "arrays": [[a.dtype.str, list(a.shape)] for a in arrays],
        }
    ).encode()
    data = b"".join([MAGIC_PIXELS, len(head).to_bytes(4, "big"), head, *(a.tobytes() for a in arrays)])
    got = StoredPrediction.from_bytes(data)
    assert got.result == s.result and got.encoded is None
    np.testing.assert_array_equal(got.image, s.image)
    np.testing.assert_array_equal(got.combined, s.combined)


def test_disk_store_bounds_count_and_age(tmp_path):
    ids = keys(6)

    async def main():
        store = DiskStore(tmp_path, max_items=3, ttl_s=0.4, max_bytes=64 << 20)
        await fill(store, ids)
        assert await kept(store, ids) == [3, 4, 5]
        assert (await store.get(ids[5])).result == {"top_k": [{"label": "5"}]}
        time.sleep(0.5)
        assert await store.get(ids[5]) is None
        await store.close()

    asyncio.run(main())


def test_disk_store_bounds_bytes(tmp_path):
    """1,000 large predictions would hold about 3 GB; the byte bound keeps the store's volume under it."""

    ids = keys(40)

    async def main():
        limit = 4 << 20
        store = DiskStore(tmp_path, max_items=1000, ttl_s=60, max_bytes=limit)
        await fill(store, ids, side=256)  # about 200 KB each, 8 MB in all
        volume = store.volume()
        held = await kept(store, ids)
        await store.close()
        return volume, held, limit

    volume, held, limit = asyncio.run(main())
    assert volume <= limit * 1.1, f"{volume} bytes on disk past a {limit}-byte limit"
    assert 39 in held and 0 not in held and len(held) < 40


def test_expired_entries_read_as_gone_and_leave_at_the_next_put(tmp_path):
    now = [1000.0]
    ids = keys(4)

    async def main():
        store = DiskStore(tmp_path, max_items=10, ttl_s=60, max_bytes=64 << 20, clock=lambda: now[0])
        await fill(store, ids[:3], side=64)  # 12 KB each: pages of their own
        full = store.volume()
        now[0] += 61
        assert await kept(store, ids[:3]) == []
        await store.put(ids[3], sample(3))  # the expired three go with it
        with store.env.begin() as txn:
            entries = txn.stat()["entries"]
        assert await kept(store, ids) == [3]
        assert store.volume() < full
        await store.close()
        return entries

    assert asyncio.run(main()) == 1


def test_a_full_map_makes_room_instead_of_failing(tmp_path, monkeypatch):
    """Past the bytes its file may take (LMDB's map), a put evicts the older half and retries, rather than
    fail every write from then on."""
    monkeypatch.setattr(DiskStore, "file_bound", staticmethod(lambda max_bytes: 8 << 20))
    evict = DiskStore._evict_older_half
    made_room = []
    monkeypatch.setattr(DiskStore, "_evict_older_half", lambda self: made_room.append(1) or evict(self))
    ids = keys(30)

    async def main():
        store = DiskStore(tmp_path, max_items=100, ttl_s=60, max_bytes=64 << 20)
        await fill(store, ids, side=580)  # about 1 MB each: 30 MB through an 8 MB file
        held = await kept(store, ids)
        await store.close()
        return held

    held = asyncio.run(main())
    assert made_room and 29 in held and 0 < len(held) < 8
    assert (tmp_path / "data.mdb").stat().st_size <= 8 << 20


def test_a_write_without_room_fails_instead_of_killing_the_process(tmp_path, monkeypatch):
    """LMDB writes through its map into a sparse file: where the file system has no page to give, the write
    killed the process with SIGBUS (a DiskStore on a 20 MB tmpfs died at its 22nd 786 KB entry). A write
    now checks for room first, and fails with ENOSPC where there is none."""
    import errno
    import os
    from types import SimpleNamespace

    free = {"bytes": 1 << 40}
    real = os.statvfs

    def statvfs(path):
        if str(path) == str(tmp_path):
            return SimpleNamespace(f_bavail=free["bytes"] // 4096, f_frsize=4096)
        return real(path)

    monkeypatch.setattr(os, "statvfs", statvfs)
    ids = keys(2)

    async def main():
        store = DiskStore(tmp_path, max_items=100, ttl_s=60, max_bytes=64 << 20)
        await store.put(ids[0], sample(0, side=300))  # 270 KB of pixels
        free["bytes"] = DiskStore.ROOM_MARGIN + 100_000
        try:
            await store.put(ids[1], sample(1, side=300))
        except OSError as e:
            refused = e
        held = await kept(store, ids)
        await store.close()
        return refused, held

    refused, held = asyncio.run(main())
    assert refused.errno == errno.ENOSPC and "no room for a store write" in str(refused)
    assert held == [0]


def two_processes_put(directory, items: int, relayed: bool) -> list[str]:
    """Two processes each put 60 entries at once into a store of `items` in `directory` (relayed: through the
    store writer their environment names); the ids they made."""
    import subprocess
    import sys

    code = (
        "import asyncio, sys\n"
        "from service.store import DiskStore, new_key\n"
        "from tests.serving.test_store import sample\n"
        "async def main():\n"
        f"    s = DiskStore(sys.argv[1], {items}, 60, 64 << 20)\n"
        f"    assert (s.link is not None) == {relayed}\n"
        "    for i in range(60):\n"
        "        key = new_key()\n"
        "        await s.put(key, sample(i))\n"
        "        print(key)\n"
        "    await s.close()\n"
        "asyncio.run(main())"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    made = [key for p in procs for key in p.communicate(timeout=120)[0].split()]
    assert [p.returncode for p in procs] == [0, 0] and len(made) == 120
    return made


def held_keys(store: DiskStore) -> list[str]:
    with store.env.begin() as txn:
        return [bytes(k).decode() for k in txn.cursor().iternext(values=False)]


def test_two_processes_writing_at_once_keep_the_count(tmp_path):
    """Each worker process writes to the one file; together they never hold more than the bound, and what
    they keep is the newest of all."""
    made = two_processes_put(tmp_path, 10, relayed=False)
    store = DiskStore(tmp_path, 10, 60, 64 << 20)
    held = held_keys(store)
    assert held == sorted(made)[-10:]
    assert all(asyncio.run(store.get(k)) is not None for k in held)
    asyncio.run(store.close())


def test_entries_of_any_size_read_back_as_put(tmp_path):
    """A store assembles each value in one buffer it keeps: a small entry after a large one is the small
    one alone (an upload kept as sent ends the value, so any byte past it would read back as part of it)."""
    import dataclasses

    ids = keys(3)
    entries = [dataclasses.replace(sample(i), image=bytes([i + 1]) * n) for i, n in enumerate((300_000, 10, 4_000))]

    for g, want in zip(asyncio.run(put_then_get(DiskStore(tmp_path, 10, 60, 64 << 20), ids, entries)), entries):
        assert g.encoded == want.image and g.result == want.result
        np.testing.assert_array_equal(g.masks[1], want.masks[1])


def test_two_stores_of_one_process_share_its_one_environment(tmp_path):
    """LMDB refuses a second open of one file in a process: two apps on one directory (as in tests) share
    it, and it stays open until the last of them closes."""

    async def main():
        a = DiskStore(tmp_path, 10, 60, 64 << 20)
        b = DiskStore(tmp_path, 10, 60, 64 << 20)
        await a.put("from-a", sample(1))
        assert (await b.get("from-a")).result == {"top_k": [{"label": "1"}]}
        await a.close()
        await a.close()  # twice: no harm
        await b.put("from-b", sample(2))
        got = await b.get("from-b")
        await b.close()
        return got

    assert asyncio.run(main()).result == {"top_k": [{"label": "2"}]}


def test_disk_store_writes_one_at_a_time_on_one_thread(tmp_path, monkeypatch):
    """Concurrent puts from one worker do not wait for SQLite's write lock against each other."""
    import threading

    store = DiskStore(tmp_path, max_items=100, ttl_s=60, max_bytes=64 << 20)
    seen, running, overlapped = [], [0], []
    put = store._put

    def spy(key, data):
        running[0] += 1
        overlapped.append(running[0] > 1)
        seen.append(threading.current_thread().name)
        time.sleep(0.01)
        put(key, data)
        running[0] -= 1

    monkeypatch.setattr(store, "_put", spy)

    async def main():
        await asyncio.gather(*(store.put(f"k{i}", sample(i)) for i in range(8)))
        got = [await store.get(f"k{i}") for i in range(8)]
        await store.close()
        return got

    got = asyncio.run(main())
    assert all(g is not None for g in got)
    assert len(seen) == 8 and len(set(seen)) == 1 and seen[0].startswith("store-writer")
    assert not any(overlapped)


def test_memory_store_bounds_bytes():
    async def main():
        one = sample(0, side=64).nbytes
        store = MemoryStore(max_items=100, ttl_s=60, max_bytes=3 * one)
        for i in range(10):
            await store.put(f"k{i}", sample(i, side=64))
        kept = [i for i in range(10) if await store.get(f"k{i}") is not None]
        return kept, store.bytes, one

    kept, held, one = asyncio.run(main())
    assert kept == [7, 8, 9] and held == 3 * one


def test_two_processes_share_the_disk_store(tmp_path):
    import subprocess
    import sys

    code = (
        "import asyncio, sys; from service.store import DiskStore; from tests.serving.test_store import sample; "
        "s = DiskStore(sys.argv[1], 10, 60, 64 << 20); asyncio.run(s.put('from-child', sample(3)))"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    store = DiskStore(tmp_path, 10, 60, 64 << 20)
    got = asyncio.run(store.get("from-child"))
    assert got is not None and got.result == {"top_k": [{"label": "3"}]}


def test_a_dead_servers_scratch_store_is_swept_at_the_next_start(tmp_path):
    import os
    import subprocess
    import sys

    from service.store import SCRATCH_PREFIX, sweep_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{SCRATCH_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}-def"
    other = tmp_path / "somebody-else"
    for d in (stale, live, other):
        d.mkdir()
        (d / "data").write_bytes(b"x")
    sweep_stale(str(tmp_path))
    assert not stale.exists() and live.exists() and other.exists()
