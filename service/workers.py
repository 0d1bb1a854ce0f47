"""Worker processes of `python -m service`: each listens on a socket of its own (SO_REUSEPORT), so the
kernel spreads connections over them evenly, and, with WARN_PIN_WORKERS, runs on a core of its own.

uvicorn's workers share one listening socket, and a worker that wakes accepts every connection
waiting. A client that opens its pool at once (wrk, aiohttp, a load balancer after a restart) lands
on a few workers and keeps them: on a 16-core GPU host, 64 connections left 3 of 16 workers with none
(9 with a large JPEG), at 8.8 cores busy in all.

uvicorn still binds the address once (the port is held, and a port taken by another program fails
there as before) and supervises the workers; each worker binds a twin of that socket with
SO_REUSEPORT and listens on it. The supervisor's socket never listens, so no connection waits on it.
Only processes of the same user can join the port this way.

Pinned, a worker's threads (its event loop, decoders, inference and store writer) share one core and
its caches rather than migrate over all of them; but a worker the kernel gave more connections than
the others then cannot use an idle core, so it is off by default. Each worker claims its core by
locking a file named after it in a directory the launcher makes; the kernel drops the lock when the
worker dies, so a worker started in its place claims the same core. One that finds every core claimed
runs unpinned.
"""

from __future__ import annotations

import fcntl
import os
import socket
from typing import IO

from uvicorn.supervisors import multiprocess

# set by `python -m service` for its workers (spawned, so they see its environment, not its objects)
SOCKETS_ENV = "WARN_OWN_SOCKETS"  # "1": each worker listens on a twin of the socket uvicorn bound
CORES_ENV = "WARN_CORE_LOCKS"  # where the workers claim their cores
_claimed: list[tuple[int, IO[str]]] = []  # this process's claim, held open for as long as it lives


def available() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


def twin(shared: socket.socket) -> socket.socket:
    """A socket bound to `shared`'s TCP address with SO_REUSEPORT (a Unix socket is returned as it is)."""
    if shared.family not in (socket.AF_INET, socket.AF_INET6):
        return shared
    own = socket.socket(shared.family, socket.SOCK_STREAM)
    own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    own.bind(shared.getsockname())
    return own


def claim_core(directory: str) -> int | None:
    """Run this process (threads made from now on included) on the first of its CPUs that no other process
    holds a claim on in `directory`; that CPU, or None when every one is claimed."""
    for cpu in sorted(os.sched_getaffinity(0)):
        lock = open(os.path.join(directory, f"cpu-{cpu}.lock"), "a")  # noqa: SIM115 (held until exit)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        _claimed.append((cpu, lock))
        os.sched_setaffinity(0, {cpu})
        return cpu
    return None


def claimed_core() -> int | None:
    """The CPU this process claimed, if it did."""
    return _claimed[0][0] if _claimed else None


class WorkerProcess(multiprocess.Process):
    """uvicorn's worker process, pinned to a core of its own and serving on a twin of the socket uvicorn
    bound for all workers, as `use` set it up."""

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # runs in the worker
        if directory := os.environ.get(CORES_ENV):
            claim_core(directory)  # the app logs which, once its logging is set up
        if os.environ.get(SOCKETS_ENV) == "1":
            sockets = [twin(s) for s in sockets or []]
        super().target(sockets)


def use(own_sockets: bool, core_locks: str | None) -> None:
    """Make uvicorn's supervisor start workers that each listen on a socket of their own (`own_sockets`)
    and claim a core of their own in `core_locks` (a directory; None: no pinning)."""
    os.environ[SOCKETS_ENV] = "1" if own_sockets else "0"
    if core_locks:
        os.environ[CORES_ENV] = core_locks
    else:
        os.environ.pop(CORES_ENV, None)
    multiprocess.Process = WorkerProcess  # the name its Multiprocess starts workers with
