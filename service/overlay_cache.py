"""Rendered overlays, kept by their full parameter set so a dashboard's repeated fetch costs nothing."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable


class OverlayCache:
    """Least recently used first out, past `max_bytes` in total; 0 turns the cache off."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes += len(value) - (len(old) if old else 0)
            self._items[key] = value
            while self.bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= len(evicted)

    def __len__(self) -> int:
        return len(self._items)
