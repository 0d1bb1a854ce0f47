"""Stored predictions, so overlay URLs can be fetched after the answer: bounded by count, bytes and TTL.

- `disk` (default): LMDB (one memory-mapped file) in a directory, shared by every worker process of
  one host, so an overlay URL returned by one worker is served by any other.
- `redis`: shared between hosts behind a load balancer; survives a replica's restart.
- `memory`: one process only.
Entries are JSON plus raw arrays (`StoredPrediction.to_bytes`), never pickles.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import shutil
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import lmdb
import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool

from service import threads
from service.store_writer import WriterLink

MAGIC = b"WARNSP3\n"  # format 3: raw arrays, then the image as pixels or as uploaded
MAGIC_PIXELS = b"WARNSP2\n"  # format 2 (the image always as pixels), still read


UUID7 = re.compile(r"[0-9a-f]{12}7[0-9a-f]{3}[89ab][0-9a-f]{15}")


class Entropy:
    """The operating system's random bytes (os.urandom), read a block at a time. Under load, each read gave
    the GIL up and waited for it behind the decoding threads: 0.1 ms on the event loop per id, where one
    read serves 400 ids. A process that forks starts a block of its own, so no two share ids."""

    def __init__(self, block: int = 4096) -> None:
        self.block = block
        self._lock = threading.Lock()
        self._pid = -1
        self._data = b""
        self._at = 0

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._pid != os.getpid() or self._at + n > len(self._data):
                self._data, self._at, self._pid = os.urandom(max(n, self.block)), 0, os.getpid()
            self._at += n
            return self._data[self._at - n : self._at]


_entropy = Entropy()


def new_key(now: float | None = None) -> str:
    """A prediction id: a UUIDv7 (RFC 9562) in hex, its creation time in milliseconds then 74 random bits,
    so a reader can tell an id whose write may still be under way from one that is gone. The random bits
    come from the operating system's generator (an id is all it takes to fetch a prediction's overlays)."""
    ms = int((time.time() if now is None else now) * 1000) & (1 << 48) - 1
    rand = int.from_bytes(_entropy.take(10), "big") & (1 << 74) - 1
    value = ms << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0b10 << 62 | rand & (1 << 62) - 1
    return f"{value:032x}"


def key_time(key: str) -> float | None:
    """When `new_key` made `key` (seconds since the epoch), or None for anything else."""
    if not UUID7.fullmatch(key):
        return None
    return int(key[:12], 16) / 1000


@dataclass
class StoredPrediction:
    result: dict[str, Any]  # the JSON answer of /v1/predict
    masks: list[np.ndarray]  # per attended layer, (K, h, w): the raw heads, for the per-head view
    maps: list[np.ndarray]  # per attended layer, (h, w): heads mixed by the layer gates
    combined: np.ndarray  # (h_L, w_L): layers mixed by the global gates
    content: tuple[int, int, int, int]  # the image's box on the model input grid
    # the image overlays are drawn on: the upload as sent (bytes), decoded only when an overlay is drawn;
    # or decoded already, at most STORE_IMAGE_MAX_SIZE (RGB, or (H, W, 3) uint8 as read back)
    image: bytes | np.ndarray | Image.Image

    @property
    def encoded(self) -> bytes | None:
        """The upload as sent, where the image is kept that way."""
        return self.image if isinstance(self.image, bytes) else None

    def picture(self) -> Image.Image:
        """A decoded image as an RGB PIL image (a copy of one read back)."""
        if isinstance(self.image, bytes):
            raise TypeError("the image is kept encoded: decode it (Runtime.picture)")
        return self.image if isinstance(self.image, Image.Image) else Image.fromarray(self.image)

    @property
    def nbytes(self) -> int:
        arrays = [*self.masks, *self.maps, self.combined]
        if isinstance(self.image, bytes):
            image = len(self.image)
        else:
            w, h = self.image.size if isinstance(self.image, Image.Image) else self.image.shape[1::-1]
            image = 3 * w * h
        return sum(a.nbytes for a in arrays) + image + 1024  # plus about the JSON answer

    def parts(self) -> list[bytes | memoryview]:
        """`to_bytes` in pieces, without copying the arrays or the image: a JSON header (the answer, the box,
        each array's dtype and shape, how the image is kept), the arrays' raw bytes, then the image (the
        upload as sent, or (H, W, 3) uint8 pixels)."""
        arrays = [np.ascontiguousarray(a) for a in (*self.masks, *self.maps, self.combined)]
        encoded = self.encoded
        pixels = None if encoded is not None else np.ascontiguousarray(np.asarray(self.image))  # a PIL image: a copy
        head = json.dumps(
            {
                "result": self.result,
                "content": list(self.content),
                "layers": len(self.masks),
                "arrays": [[a.dtype.str, list(a.shape)] for a in arrays],
                "image": "encoded" if pixels is None else [pixels.dtype.str, list(pixels.shape)],
            }
        ).encode()
        tail = encoded if pixels is None else pixels.data
        return [MAGIC, len(head).to_bytes(4, "big"), head, *(a.data for a in arrays), tail]

    def to_bytes(self) -> bytes:
        return b"".join(self.parts())

    @classmethod
    def from_bytes(cls, data: bytes, start: int = 0) -> StoredPrediction:
        """The prediction `to_bytes` wrote at `start` of `data`: its arrays are views of `data`, not copies."""
        magic = data[start : start + len(MAGIC)]
        if magic not in (MAGIC, MAGIC_PIXELS):
            raise ValueError("not a stored prediction of this format")
        i = start + len(MAGIC) + 4
        n = int.from_bytes(data[i - 4 : i], "big")
        head = json.loads(data[i : i + n])
        if magic == MAGIC_PIXELS:  # the image was the last array
            *head["arrays"], shape = head["arrays"]
            head["image"] = shape
        offset, arrays = i + n, []
        for dtype, shape in head["arrays"]:
            count = int(np.prod(shape))
            arrays.append(np.frombuffer(data, dtype, count, offset).reshape(shape))  # views, no copies
            offset += count * np.dtype(dtype).itemsize
        if head["image"] == "encoded":
            image: bytes | np.ndarray = data[offset:]
        else:
            dtype, shape = head["image"]
            image = np.frombuffer(data, dtype, int(np.prod(shape)), offset).reshape(shape)
        layers = head["layers"]
        return cls(
            result=head["result"],
            masks=arrays[:layers],
            maps=arrays[layers : 2 * layers],
            combined=arrays[2 * layers],
            content=tuple(head["content"]),
            image=image,
        )


class PredictionStore(Protocol):
    unavailable: tuple[type[Exception], ...]  # errors that say the store is down, not that a call was wrong

    async def put(self, key: str, value: StoredPrediction) -> None: ...

    async def get(self, key: str) -> StoredPrediction | None: ...

    async def close(self) -> None: ...


SCRATCH_PREFIX = "warn-predictions-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(root: str) -> None:
    """Remove scratch stores whose process is gone: a killed server cannot remove its own, and in
    /dev/shm what it left would hold memory until the next boot."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        pid = name.removeprefix(SCRATCH_PREFIX).split("-", 1)[0]
        if name.startswith(SCRATCH_PREFIX) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def scratch_dir(room: int) -> str:
    """A new directory for a disk store: in RAM (/dev/shm) where it has `room` bytes to spare, so that the
    kernel never writes the store's pages back to a disk; else in the temp directory.
    Its name holds this process's id, so a later start can remove it if this process dies unannounced."""
    root = tempfile.gettempdir()
    shm = "/dev/shm"
    try:
        if os.access(shm, os.W_OK):
            sweep_stale(shm)
            if shutil.disk_usage(shm).free >= room:
                root = shm
    except OSError:
        pass
    sweep_stale(root)
    return tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=root)


def _size(value: Any) -> int:
    return getattr(value, "nbytes", 0)


class MemoryStore:
    """In-process store: the oldest entries go first past `max_items` or `max_bytes`; entries expire after `ttl_s`."""

    unavailable: tuple[type[Exception], ...] = ()

    def __init__(self, max_items: int, ttl_s: float, max_bytes: int | None = None, clock=time.monotonic) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.bytes = 0
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    async def put(self, key: str, value: Any) -> None:
        with self._lock:
            if key in self._items:
                self.bytes -= _size(self._items.pop(key)[1])
            self._items[key] = (self._clock() + self.ttl_s, value)
            self.bytes += _size(value)
            while len(self._items) > self.max_items or (
                self.max_bytes is not None and self.bytes > self.max_bytes and len(self._items) > 1
            ):
                self.bytes -= _size(self._items.popitem(last=False)[1][1])

    async def get(self, key: str) -> Any | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._items[key]
                self.bytes -= _size(entry[1])
                return None
            return entry[1]

    async def close(self) -> None:
        self._items.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


class DiskStore:
    """LMDB in `directory`: one memory-mapped file that every worker process of a host shares. Writers take
    turns on a lock in shared memory; readers never wait.

    Prediction ids are UUIDv7s (`new_key`), so key order is age order. Each put therefore evicts from the
    front of the key order: entries past their `ttl_s`, and the oldest while the store holds more than
    `max_items` entries or `max_bytes` of pages. A get treats an expired entry as gone. Within a worker,
    writes run one at a time on a thread of their own, off the event loop; where `python -m service`
    started a store writer (service/store_writer.py, with `relay`), that thread sends them to it, and
    writes them itself only while that process is away."""

    unavailable: tuple[type[Exception], ...] = ()

    EXPIRY = struct.Struct(">d")  # each value starts with when it expires (seconds since the epoch)

    def __init__(
        self,
        directory: Path | str | None,
        max_items: int,
        ttl_s: float,
        max_bytes: int,
        temporary: bool = False,
        clock=time.time,
        relay: bool = True,
    ) -> None:
        if directory is None:
            directory = scratch_dir(self.file_bound(max_bytes))
        self.directory = Path(directory)
        self.temporary = temporary  # remove the directory on close
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self.env = _environment(self.directory, self.file_bound(max_bytes))
        self.closed = False
        self._writer = threads.pool(1, "store-writer")
        self._buffer = bytearray()  # the writer thread's
        self.link = WriterLink.from_env() if relay else None  # the store writer's process, where there is one

    @staticmethod
    def file_bound(max_bytes: int) -> int:
        """The most the file may grow to (LMDB's map size): twice the entries' bound, so that the pages LMDB
        frees, and reuses only once no reader still sees them, have room beside the live ones."""
        return 2 * max_bytes + (64 << 20)

    def volume(self) -> int:
        """Bytes of the pages that hold entries."""
        with self.env.begin() as txn:
            return self._used(txn.stat())

    @staticmethod
    def _used(stat: dict[str, int]) -> int:
        return stat["psize"] * (stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"])

    def _message(self, key: str, value: StoredPrediction) -> memoryview:
        """The key's length and the key, then the value LMDB stores (expiry, then `value.to_bytes()`), assembled
        in a buffer this store keeps (a new one for each put, mmapped above 1 MB (service/memory.py), cost a
        page fault per 4 KB), or the one it shares with the store writer."""
        k = key.encode()
        if len(k) > 255:
            raise ValueError("a store key is at most 255 bytes")
        head = bytes([len(k)]) + k + self.EXPIRY.pack(self._clock() + self.ttl_s)
        parts = [memoryview(p).cast("B") for p in (head, *value.parts())]
        size = sum(len(p) for p in parts)
        if self.link is not None:
            view = self.link.buffer(size)
        else:
            if len(self._buffer) < size:
                self._buffer = bytearray(size)
            view = memoryview(self._buffer)
        offset = 0
        for p in parts:
            view[offset : offset + len(p)] = p
            offset += len(p)
        return view[:size]

    def _put(self, key: str, value: StoredPrediction) -> None:
        message = self._message(key, value)
        if self.link is not None:
            try:
                return self.link.write(message)
            except (OSError, EOFError, TimeoutError):  # it is being restarted: this write waits for no one
                pass
        self.write(message)

    # Beside an entry's own bytes, a write may take pages for the tree, the pages it copies and the free list.
    ROOM_MARGIN = 4 << 20

    def check_room(self, n: int) -> None:
        """Raise ENOSPC where the file system lacks room for a write of `n` bytes.

        LMDB writes through its map (writemap) into a sparse file, so a page the file system cannot give (a
        full disk, or /dev/shm filled by other processes) kills the process with SIGBUS instead of failing:
        every worker would die at its next write, again and again. A store whose own free pages would have
        held the write is refused too: its overlays are lost until there is room, not its workers."""
        stat = os.statvfs(self.directory)
        free = stat.f_bavail * stat.f_frsize
        if free < n + self.ROOM_MARGIN:
            raise OSError(errno.ENOSPC, f"no room for a store write of {n:,} bytes: {free:,} free in {self.directory}")

    def write(self, message: memoryview) -> None:
        """Store what `_message` made (here, or in the store writer's process)."""
        n = message[0]
        key, data = bytes(message[1 : 1 + n]), message[1 + n :]
        self.check_room(len(data))
        for attempt in range(3):
            try:
                return self._write(key, data)
            except lmdb.MapFullError:
                if attempt == 2:
                    raise
                # The file is at its bound. Pages freed by a write are reused two writes later, and never while
                # a reader may still see them: clear the slots of readers whose process died, and make room.
                self.env.reader_check()
                self._evict_older_half()

    def _evict_older_half(self) -> None:
        with self.env.begin(write=True) as txn:
            cursor = txn.cursor()
            cursor.first()
            for _ in range(max(1, txn.stat()["entries"] // 2)):
                if not cursor.delete():
                    break

    def _write(self, key: bytes, data: memoryview) -> None:
        """Put, then evict from the oldest what is expired or past the bounds."""
        now = self._clock()
        with self.env.begin(write=True, buffers=True) as txn:
            txn.put(key, data)
            stat = txn.stat()
            count = stat["entries"]
            cursor = txn.cursor()
            cursor.first()
            while count > 1 and (
                count > self.max_items
                or self._used(stat) > self.max_bytes
                or self.EXPIRY.unpack_from(cursor.value())[0] <= now
            ):
                cursor.delete()  # and on to the next oldest
                count -= 1
                stat = txn.stat()

    def _get(self, key: str) -> StoredPrediction | None:
        with self.env.begin() as txn:
            data = txn.get(key.encode())
        if data is None or self.EXPIRY.unpack_from(data)[0] <= self._clock():
            return None
        return StoredPrediction.from_bytes(data, self.EXPIRY.size)

    async def put(self, key: str, value: StoredPrediction) -> None:
        await asyncio.get_running_loop().run_in_executor(self._writer, self._put, key, value)

    async def get(self, key: str) -> StoredPrediction | None:
        return await run_in_threadpool(self._get, key)

    async def close(self) -> None:
        self._writer.shutdown(wait=False)  # Runtime.stop has waited for the writes, up to its timeout
        if self.link is not None:
            self.link.close()
        if not self.closed:
            self.closed = True
            _release(self.env)
        if self.temporary:
            shutil.rmtree(self.directory, ignore_errors=True)


# LMDB allows one open environment per file and process; stores of one process on one directory share it.
_environments: dict[str, tuple[lmdb.Environment, int]] = {}
_environments_lock = threading.Lock()


def _environment(directory: Path, map_size: int) -> lmdb.Environment:
    """This process's environment on `directory`, opened on first use (at `map_size`; later users share
    it as it is)."""
    path = os.path.realpath(directory)
    with _environments_lock:
        env, users = _environments.get(path) or (None, 0)
        if env is None:
            # sync off: a lost write costs one overlay URL, and a prediction store outlives no reboot
            env = lmdb.open(
                path,
                map_size=map_size,
                sync=False,
                metasync=False,
                writemap=True,  # a put copies into the map itself: half the CPU of a put through malloc'd pages
                readahead=False,
                max_readers=4096,  # more than the threads of 64 workers that might read at once
            )
        _environments[path] = (env, users + 1)
        return env


def _release(env: lmdb.Environment) -> None:
    with _environments_lock:
        path = os.path.realpath(env.path())
        _, users = _environments[path]
        if users > 1:
            _environments[path] = (env, users - 1)
        else:
            del _environments[path]
            env.close()


class RedisStore:
    """Shared store in Redis: each entry expires by TTL; an index sorted by time trims the oldest past `max_items`."""

    def __init__(self, url: str, max_items: int, ttl_s: float, prefix: str = "warn:prediction:") -> None:
        import redis.asyncio as redis

        self.redis = redis.from_url(url)
        self.unavailable = (redis.ConnectionError, redis.TimeoutError)
        self.max_items = max_items
        self.ttl_ms = int(ttl_s * 1000)
        self.prefix = prefix
        self.index = prefix + "index"

    async def put(self, key: str, value: StoredPrediction) -> None:
        data = await run_in_threadpool(value.to_bytes)
        now = time.time()
        async with self.redis.pipeline(transaction=True) as p:
            p.set(self.prefix + key, data, px=self.ttl_ms)
            p.zadd(self.index, {key: now})
            p.zremrangebyscore(self.index, 0, now - self.ttl_ms / 1000)  # expired keys leave the index
            p.zcard(self.index)
            *_, count = await p.execute()
        if count > self.max_items:
            oldest = await self.redis.zpopmin(self.index, count - self.max_items)
            if oldest:
                await self.redis.delete(*(self.prefix + k.decode() for k, _ in oldest))

    async def get(self, key: str) -> StoredPrediction | None:
        data = await self.redis.get(self.prefix + key)
        return None if data is None else StoredPrediction.from_bytes(data)

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        await self.redis.aclose()
