"""Worker processes that each listen on a socket of their own (SO_REUSEPORT), so the kernel spreads
connections over them evenly.

uvicorn's workers share one listening socket, and a worker that wakes accepts every connection
waiting. A client that opens its pool at once (wrk, aiohttp, a load balancer after a restart) lands
on a few workers and keeps them: on a 16-core GPU host, 64 connections left 3 of 16 workers with none
(9 with a large JPEG), at 8.8 cores busy in all.

uvicorn still binds the address once (the port is held, and a port taken by another program fails
there as before) and supervises the workers; each worker binds a twin of that socket with
SO_REUSEPORT and listens on it. The supervisor's socket never listens, so no connection waits on it.
Only processes of the same user can join the port this way.
"""

from __future__ import annotations

import socket

from uvicorn.supervisors import multiprocess


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


class OwnSocketProcess(multiprocess.Process):
    """uvicorn's worker process, serving on a twin of the socket uvicorn bound for all workers."""

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # runs in the worker
        super().target([twin(s) for s in sockets or []])


def use_own_sockets() -> None:
    """Make uvicorn's supervisor start workers that each listen on a socket of their own."""
    multiprocess.Process = OwnSocketProcess  # the name its Multiprocess starts workers with
