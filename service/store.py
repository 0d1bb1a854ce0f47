"""Stored predictions, so overlay URLs can be fetched after the answer: bounded by count, bytes and TTL.

- `disk` (default): diskcache (SQLite and files) in a directory, shared by every worker process of
  one host, so an overlay URL returned by one worker is served by any other.
- `redis`: shared between hosts behind a load balancer; survives a replica's restart.
- `memory`: one process only.
Entries are JSON plus raw arrays (`StoredPrediction.to_bytes`), never pickles.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool

from service import threads

MAGIC = b"WARNSP3\n"  # format 3: raw arrays, then the image as pixels or as uploaded
MAGIC_PIXELS = b"WARNSP2\n"  # format 2 (the image always as pixels), still read


UUID7 = re.compile(r"[0-9a-f]{12}7[0-9a-f]{3}[89ab][0-9a-f]{15}")


def new_key(now: float | None = None) -> str:
    """A prediction id: a UUIDv7 (RFC 9562) in hex, its creation time in milliseconds then 74 random bits,
    so a reader can tell an id whose write may still be under way from one that is gone."""
    ms = int((time.time() if now is None else now) * 1000) & (1 << 48) - 1
    rand = secrets.randbits(74)
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
    def from_bytes(cls, data: bytes) -> StoredPrediction:
        magic = data[: len(MAGIC)]
        if magic not in (MAGIC, MAGIC_PIXELS):
            raise ValueError("not a stored prediction of this format")
        i = len(MAGIC) + 4
        n = int.from_bytes(data[len(MAGIC) : i], "big")
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
    """A new directory for a disk store: in RAM (/dev/shm) where it has `room` bytes to spare twice
    over, since creating files there costs half what it does on a disk; else in the temp directory.
    Its name holds this process's id, so a later start can remove it if this process dies unannounced."""
    root = tempfile.gettempdir()
    shm = "/dev/shm"
    try:
        if os.access(shm, os.W_OK):
            sweep_stale(shm)
            if shutil.disk_usage(shm).free >= 2 * room:
                root = shm
    except OSError:
        pass
    sweep_stale(root)
    return tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=root)


def _size(value: Any) -> int:
    return getattr(value, "nbytes", 0)


class MemoryStore:
    """In-process store: the oldest entries go first past `max_items` or `max_bytes`; entries expire after `ttl_s`."""

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


class DiskStore:
    """diskcache in `directory`: safe across processes, least recently stored evicted first past
    `max_bytes` (diskcache's size limit) or `max_items`, each entry expiring after `ttl_s`.

    SQLite takes one writer at a time, and a writer that finds the lock taken polls it with sleeps of up
    to 100 ms. So entries are spread by id over `shards` databases (subdirectories), each bounded by its
    share of the limits, and a host's workers mostly write to different ones. Within a worker, writes
    run one at a time on a thread of their own, rather than contend for the lock and the interpreter."""

    def __init__(
        self,
        directory: Path | str | None,
        max_items: int,
        ttl_s: float,
        max_bytes: int,
        temporary: bool = False,
        shards: int = 1,
    ) -> None:
        import diskcache

        if directory is None:
            directory = scratch_dir(max_bytes)
        self.directory = Path(directory)
        self.temporary = temporary  # remove the directory on close
        shards = min(shards, max_items)
        self.max_items = max_items // shards  # per shard, so never more than max_items in all
        self.ttl_s = ttl_s
        self.shards = [
            diskcache.Cache(
                str(self.directory if shards == 1 else self.directory / f"shard-{i}"),
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

    def volume(self) -> int:
        """Bytes on disk, every shard's."""
        return sum(cache.volume() for cache in self.shards)

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
        self._writer.shutdown(wait=False)  # Runtime.stop has waited for the writes, up to its timeout
        for cache in self.shards:
            cache.close()
        if self.temporary:
            shutil.rmtree(self.directory, ignore_errors=True)


class RedisStore:
    """Shared store in Redis: each entry expires by TTL; an index sorted by time trims the oldest past `max_items`."""

    def __init__(self, url: str, max_items: int, ttl_s: float, prefix: str = "warn:prediction:") -> None:
        import redis.asyncio as redis

        self.redis = redis.from_url(url)
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
