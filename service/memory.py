"""A worker's memory: freed image buffers go back to the system, and the garbage collector skips what
start-up built.

glibc keeps freed memory for reuse: buffers above its mmap threshold are unmapped when freed, but
it raises that threshold (up to 32 MB) each time such a buffer is freed, so after a few large
images every later decode buffer comes from the heap, whose top fragments and is never trimmed.
The process then stays at its peak. A fixed threshold keeps large buffers mmapped (returned on
free), and fewer arenas keep many decoding threads from each holding their own.

Python's collector walks every tracked object on each full collection: in a worker about 100,000 built at
start-up (modules, the app, the model's metadata), 45-120 ms of event loop each time, every few seconds
under load (2 cores, 480 req/s). Frozen, they are skipped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

log = logging.getLogger("service.memory")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


@cache
def glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc's own)
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def return_freed_memory(mmap_threshold: int = 1 << 20, arenas: int = 2) -> bool:
    """Set glibc's malloc to hand large freed buffers back; False where the C library is not glibc."""
    libc = glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    ok = all(
        mallopt(option, value)
        for option, value in (
            (M_MMAP_THRESHOLD, mmap_threshold),
            (M_TRIM_THRESHOLD, 4 * mmap_threshold),
            (M_ARENA_MAX, arenas),
        )
    )
    if not ok:
        log.warning("mallopt refused a setting; freed memory may stay with the process")
    return ok


def trim_heap() -> bool:
    """Hand the free pages inside the heap back to the system (glibc's malloc_trim); False where the C
    library is not glibc.

    Buffers under the mmap threshold (64 KB body chunks, small images, grpc's slices) come from the heap,
    and a burst of them leaves it at its peak: free, but kept, unless trimmed. A worker that had just
    served 60 v2 requests of 13.5 MB at once kept 0.9 GB, 0.14 GB once trimmed. The call takes 70-95 ms
    on such a heap, holding malloc's locks: run it off the event loop, and when the worker is quiet."""
    libc = glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)  # 1 where it freed pages, 0 where there were none
    return True


# Collect the youngest generation after this many more allocations than frees (Python's default: 700).
# A request's objects die by reference counting; at 700, requests in flight set off about 28 young
# collections a second per worker, each walking them; at this many, next to none.
YOUNG_THRESHOLD = 10_000


@contextmanager
def startup_objects_frozen() -> Iterator[None]:
    """Within the block, objects alive at its start are left out of garbage collection, and young
    collections are rarer (YOUNG_THRESHOLD); both are undone after it (tests start many apps in one
    process)."""
    threshold = gc.get_threshold()
    gc.collect()  # garbage from start-up is freed, not frozen
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()
