"""Stored predictions, so that overlay URLs can be fetched after the answer: bounded by count and TTL."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass
class StoredPrediction:
    result: dict[str, Any]  # the JSON answer of /v1/predict
    masks: list[np.ndarray]  # per attended layer, (K, h, w)
    gates: list[np.ndarray]  # per attended layer, (K,)
    global_gates: np.ndarray  # (L+1,)
    content: tuple[int, int, int, int]  # the image's box on the model input grid
    image: np.ndarray  # (H, W, 3) uint8, the image (at most STORE_IMAGE_MAX_SIZE) overlays are drawn on


class PredictionStore(Protocol):
    def put(self, key: str, value: StoredPrediction) -> None: ...

    def get(self, key: str) -> StoredPrediction | None: ...


class MemoryStore:
    """In-process store: least recently stored entries go first past `max_items`; entries expire after `ttl_s`."""

    def __init__(self, max_items: int, ttl_s: float, clock=time.monotonic) -> None:
        self.max_items = max_items
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, StoredPrediction]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, value: StoredPrediction) -> None:
        with self._lock:
            self._items[key] = (self._clock() + self.ttl_s, value)
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def get(self, key: str) -> StoredPrediction | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._items[key]
                return None
            return entry[1]

    def __len__(self) -> int:
        return len(self._items)
