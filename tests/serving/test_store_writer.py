"""The store writer: one process makes the disk store's writes for every worker (service/store_writer.py)."""

import asyncio
import dataclasses
import os
import signal
import time
from multiprocessing.connection import Client

import pytest

from service.store import DiskStore
from service.store_writer import StoreWriter
from tests.serving.test_store import held_keys, keys, put_then_get, sample, two_processes_put

ITEMS = 10


@pytest.fixture
def writer(tmp_path, monkeypatch):
    monkeypatch.setenv("WARN_STORE_DIR", str(tmp_path))
    monkeypatch.setenv("WARN_STORE_MAX_ITEMS", str(ITEMS))
    monkeypatch.setenv("WARN_STORE_MAX_BYTES", str(64 << 20))
    w = StoreWriter()
    w.start()
    for name, value in w.env().items():
        monkeypatch.setenv(name, value)
    try:
        yield w
    finally:
        w.stop()


def worker_store(tmp_path) -> DiskStore:
    """A worker's store, as its app makes it under `python -m service` (the writer's address in its env)."""
    return DiskStore(tmp_path, ITEMS, 60, 64 << 20)


def test_a_workers_writes_are_made_by_the_writer_process(writer, tmp_path, monkeypatch):
    """The worker's store only sends: with its own LMDB writes broken, every put still lands, and reads
    back as put, in the worker and in another store on the file."""
    store = worker_store(tmp_path)
    assert store.link is not None
    monkeypatch.setattr(store, "write", lambda message: pytest.fail("the worker wrote the entry itself"))
    ids = keys(3)

    async def main():
        for i, key in enumerate(ids):
            await store.put(key, sample(i))
        got = [await store.get(key) for key in ids]
        await store.close()
        return got

    got = asyncio.run(main())
    assert [g.result for g in got] == [sample(i).result for i in range(3)]
    assert (got[2].image == sample(2).image).all()
    assert oct(os.stat(writer.folder).st_mode & 0o777) == "0o700"


def test_two_workers_writing_at_once_keep_the_newest(writer, tmp_path):
    """Two worker processes put 60 entries each at once, through the writer: the file holds exactly the
    newest ITEMS of all 120, each readable."""
    made = two_processes_put(tmp_path, ITEMS, relayed=True)
    store = DiskStore(tmp_path, ITEMS, 60, 64 << 20, relay=False)
    held = held_keys(store)
    assert held == sorted(made)[-ITEMS:]
    assert all(asyncio.run(store.get(k)) is not None for k in held)
    asyncio.run(store.close())


def test_entries_larger_than_the_writers_buffer_arrive_whole(writer, tmp_path):
    """The writer reads into a buffer it keeps (1 MB at first): a larger entry, and a small one after it,
    read back exactly as put."""
    ids = keys(3)
    entries = [dataclasses.replace(sample(i), image=bytes([i + 1]) * n) for i, n in enumerate((3_000_000, 10, 40))]

    for g, want in zip(asyncio.run(put_then_get(worker_store(tmp_path), ids, entries)), entries):
        assert g.encoded == want.image and g.result == want.result


def test_a_write_the_writer_cannot_make_fails_that_put_alone(writer, tmp_path):
    """An entry larger than the whole file fails its own put, with the writer's reason; the next is stored."""
    ids = keys(2)
    huge = dataclasses.replace(sample(0), image=b"x" * (200 << 20))

    async def main():
        store = worker_store(tmp_path)
        with pytest.raises(RuntimeError, match="MapFull"):
            await store.put(ids[0], huge)
        await store.put(ids[1], sample(1))
        got = [await store.get(key) for key in ids]
        await store.close()
        return got

    assert [g and g.result for g in asyncio.run(main())] == [None, sample(1).result]
    assert writer.restarts == 0


def test_a_peer_without_the_key_is_refused_and_the_writer_serves_on(writer, tmp_path):
    with pytest.raises(Exception, match="digest"):  # multiprocessing's AuthenticationError
        Client(writer.address, "AF_UNIX", authkey=b"not the key")
    store = worker_store(tmp_path)
    asyncio.run(store.put(keys(1)[0], sample(4)))
    assert asyncio.run(store.get(keys(1)[0])).result == sample(4).result
    asyncio.run(store.close())


def test_while_the_writer_is_away_a_worker_writes_itself_and_then_uses_it_again(writer, tmp_path, monkeypatch):
    store = worker_store(tmp_path)
    ids = keys(3)
    asyncio.run(store.put(ids[0], sample(0)))
    first = writer.process.pid
    os.kill(first, signal.SIGKILL)
    asyncio.run(store.put(ids[1], sample(1)))  # the connection breaks: this worker writes it
    assert asyncio.run(store.get(ids[1])).result == sample(1).result
    deadline = time.monotonic() + 60
    while not (writer.process.pid != first and os.path.exists(writer.address)):
        assert time.monotonic() < deadline, "the store writer was not restarted"
        time.sleep(0.1)
    assert writer.restarts == 1
    store.link._down_until = 0  # as if RETRY_AFTER_S had passed
    monkeypatch.setattr(store, "write", lambda message: pytest.fail("the worker wrote the entry itself"))
    asyncio.run(store.put(ids[2], sample(2)))
    assert asyncio.run(store.get(ids[2])).result == sample(2).result
    asyncio.run(store.close())


def test_without_memfd_the_workers_write_themselves(writer, tmp_path, monkeypatch):
    """memfd_create is Linux's: elsewhere a worker's store ignores the writer's address and writes itself."""
    monkeypatch.delattr(os, "memfd_create")
    store = worker_store(tmp_path)
    assert store.link is None
    asyncio.run(store.put(keys(1)[0], sample(5)))
    assert asyncio.run(store.get(keys(1)[0])).result == sample(5).result
    asyncio.run(store.close())


def test_a_writer_that_never_answers_costs_a_write_its_timeout_and_no_more(tmp_path, monkeypatch):
    """A store writer that takes connections but answers nothing (hung): the put is made by the worker
    after REPLY_TIMEOUT_S, and the next ones at once, while the link rests."""
    import threading
    from multiprocessing.connection import Listener

    from service import store_writer

    key = os.urandom(32)
    address = str(tmp_path / "socket")
    listener = Listener(address, "AF_UNIX", authkey=key)
    held = []
    threading.Thread(target=lambda: held.append(listener.accept()), daemon=True).start()
    monkeypatch.setenv(store_writer.ADDRESS_ENV, address)
    monkeypatch.setenv(store_writer.KEY_ENV, key.hex())
    monkeypatch.setattr(store_writer, "REPLY_TIMEOUT_S", 0.5)
    store = DiskStore(tmp_path / "store", ITEMS, 60, 64 << 20)
    ids = keys(3)
    took = []
    for i, k in enumerate(ids):
        began = time.monotonic()
        asyncio.run(store.put(k, sample(i)))
        took.append(time.monotonic() - began)
    assert [asyncio.run(store.get(k)).result for k in ids] == [sample(i).result for i in range(3)]
    assert 0.5 <= took[0] < 5 and max(took[1:]) < 0.4, took
    asyncio.run(store.close())
    listener.close()


def test_the_store_writer_is_on_by_itself_only_where_the_workers_share_a_session(monkeypatch):
    from service.config import Settings

    monkeypatch.setattr(Settings, "shared_session", lambda self: True)
    assert Settings(WORKERS=4).store_writer()
    assert not Settings(WORKERS=1).store_writer()  # one worker: nobody to wait for
    assert not Settings(WORKERS=4, STORE="redis").store_writer()
    assert not Settings(WORKERS=4, STORE_WRITER=False).store_writer()
    monkeypatch.setattr(Settings, "shared_session", lambda self: False)
    assert not Settings(WORKERS=4).store_writer()  # the CPU: off unless asked for
    assert Settings(WORKERS=4, STORE_WRITER=True).store_writer()
    monkeypatch.setenv("WARN_STORE_WRITER", " Auto ")
    assert Settings().STORE_WRITER == "auto"
    monkeypatch.setenv("WARN_STORE_WRITER", "maybe")
    with pytest.raises(ValueError, match="STORE_WRITER"):
        Settings()
