"""Rendered overlays, kept by their full parameter set so a dashboard's repeated fetch costs nothing, and
the decoded images they are drawn on, so a prediction's other layers cost no second decode."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


class OverlayCache:
    """Least recently used first out, past `max_bytes` in total; 0 turns the cache off."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()  # value, its bytes
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            self._items.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: Any, nbytes: int | None = None) -> None:
        """`nbytes`: what `value` holds, where it is not bytes."""
        size = len(value) if nbytes is None else nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes += size - (old[1] if old else 0)
            self._items[key] = (value, size)
            while self.bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self.bytes -= evicted

    def __len__(self) -> int:
        return len(self._items)
