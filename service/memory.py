"""Give freed image buffers back to the system.

glibc keeps freed memory for reuse: buffers above its mmap threshold are unmapped when freed, but
it raises that threshold (up to 32 MB) each time such a buffer is freed, so after a few large
images every later decode buffer comes from the heap, whose top fragments and is never trimmed.
The process then stays at its peak. A fixed threshold keeps large buffers mmapped (returned on
free), and fewer arenas keep many decoding threads from each holding their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("service.memory")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def return_freed_memory(mmap_threshold: int = 1 << 20, arenas: int = 2) -> bool:
    """Set glibc's malloc to hand large freed buffers back; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
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
