"""Stored predictions, so overlay URLs can be fetched after the answer: bounded by count and TTL.

`memory` keeps them in the process; `redis` shares them between replicas behind a load
balancer, so an overlay URL returned by one replica is served by any other, and survives a
replica's restart. Redis entries are JSON plus raw arrays, never pickles.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass
class StoredPrediction:
    result: dict[str, Any]  # the JSON answer of /v1/predict
    masks: list[np.ndarray]  # per attended layer, (K, h, w): the raw heads, for the per-head view
    maps: list[np.ndarray]  # per attended layer, (h, w): heads mixed by the layer gates
    combined: np.ndarray  # (h_L, w_L): layers mixed by the global gates
    content: tuple[int, int, int, int]  # the image's box on the model input grid
    image: np.ndarray  # (H, W, 3) uint8, the image (at most STORE_IMAGE_MAX_SIZE) overlays are drawn on

    def to_bytes(self) -> bytes:
        arrays = {f"mask_{i}": m for i, m in enumerate(self.masks)}
        arrays.update({f"map_{i}": m for i, m in enumerate(self.maps)})
        buf = io.BytesIO()
        np.savez(buf, combined=self.combined, image=self.image, **arrays)
        head = json.dumps({"result": self.result, "content": list(self.content), "layers": len(self.masks)}).encode()
        return len(head).to_bytes(4, "big") + head + buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> StoredPrediction:
        n = int.from_bytes(data[:4], "big")
        head = json.loads(data[4 : 4 + n])
        with np.load(io.BytesIO(data[4 + n :]), allow_pickle=False) as z:
            layers = range(head["layers"])
            return cls(
                result=head["result"],
                masks=[z[f"mask_{i}"] for i in layers],
                maps=[z[f"map_{i}"] for i in layers],
                combined=z["combined"],
                content=tuple(head["content"]),
                image=z["image"],
            )


class PredictionStore(Protocol):
    async def put(self, key: str, value: StoredPrediction) -> None: ...

    async def get(self, key: str) -> StoredPrediction | None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """In-process store: the oldest entries go first past `max_items`; entries expire after `ttl_s`."""

    def __init__(self, max_items: int, ttl_s: float, clock=time.monotonic) -> None:
        self.max_items = max_items
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    async def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._items[key] = (self._clock() + self.ttl_s, value)
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    async def get(self, key: str) -> Any | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._items[key]
                return None
            return entry[1]

    async def close(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


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
        now = time.time()
        async with self.redis.pipeline(transaction=True) as p:
            p.set(self.prefix + key, value.to_bytes(), px=self.ttl_ms)
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
