"""Thread pools whose threads carry their names down to the OS, so `top -H`, `ps -L` and /proc show which
of a worker's threads is busy: its event loop (the process's name), `decode_N`, `inference_0`,
`store-writer_0`, the shared session's `session-run_N` and the store writer's `store-relay`. Python sets
only its own name for a thread before 3.14."""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor

PR_SET_NAME = 15


def name_os_thread() -> None:
    """The calling thread's Python name, as the OS shows it (the first 15 bytes)."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(PR_SET_NAME, threading.current_thread().name.encode()[:15])  # the kernel keeps 15 bytes
    except (OSError, AttributeError):  # not Linux
        pass


def pool(threads: int, name: str) -> ThreadPoolExecutor:
    """A ThreadPoolExecutor whose threads are named `name_0`, `name_1`... in Python and in the OS."""
    return ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=name_os_thread)
