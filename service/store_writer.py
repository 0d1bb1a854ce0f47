"""One process that makes every write to the disk store of `python -m service`'s workers (WARN_STORE_WRITER).

LMDB lets one writer at a time hold a file's write lock, and a worker's writer thread that holds it takes
its own GIL back after each LMDB call: it waits for it there while that worker's event loop and decoders
run, up to sys.getswitchinterval() (5 ms) each time, and every other worker's write waits for the lock
all that while. On an H100 host at 64 connections that cost 18% of the requests a second and doubled the
p99 latency (the README, "On a GPU host"). So the workers send their entries here, a process with no
such rival, and read the file themselves as before (readers never wait for the lock).

A worker assembles each entry in a memory file this process maps too, and sends only its length; each
worker's connection has a thread of its own here, so a worker slow to send holds up only its own
write. A worker whose write this process does not take (it died, is being restarted, or hangs) makes
that write itself.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.reduction import recv_handle, send_handle

from service import threads
from service.children import Child, as_child_of_the_service, peer_from_env
from service.logs import show_service_logs

log = logging.getLogger("service.store_writer")

ADDRESS_ENV, KEY_ENV = "WARN_STORE_WRITER_ADDRESS", "WARN_STORE_WRITER_KEY"
PROCESS_NAME = b"warn-store"  # what ps, top and /proc/<pid>/comm show for it
REPLY_TIMEOUT_S = 2.0  # a write not taken in this long (a put takes milliseconds) is made by the worker itself
RETRY_AFTER_S = 1.0  # after a failed write, a worker writes itself this long before it reconnects
HEADER = struct.Struct(">Q?")  # an entry's length in the worker's buffer; whether the buffer's descriptor follows


def available() -> bool:
    """Whether workers can share an entry's buffer with the store writer (memfd_create: Linux)."""
    return hasattr(os, "memfd_create")


def serve(address: str, authkey: bytes) -> None:
    """The store writer's process: opens the store, then listens at `address` (its existence says ready)."""
    from service.config import Settings
    from service.store import DiskStore

    show_service_logs()
    as_child_of_the_service(PROCESS_NAME)
    s = Settings()
    store = DiskStore(s.STORE_DIR, s.STORE_MAX_ITEMS, s.STORE_TTL_S, s.STORE_MAX_BYTES, relay=False)
    listener = Listener(address, "AF_UNIX", authkey=authkey)
    while True:
        try:
            conn = listener.accept()
        except Exception as e:  # a peer without the key, or one that hung up mid-handshake
            log.warning("refused a connection to the store writer: %r", e)
            continue
        threading.Thread(target=relay, args=(conn, store.write), daemon=True, name="store-relay").start()


def relay(conn: Connection, write) -> None:
    threads.name_os_thread()
    take_writes(conn, write)


def take_writes(conn: Connection, write) -> None:
    """Writes what one worker sends, one entry at a time, each answered with b"" or why it failed. An entry
    comes as its length in the worker's buffer, a memory file it shares (its descriptor sent with the
    first entry in it), so the entry is copied once, into the store."""
    view: memoryview | None = None
    with conn:
        while True:
            try:
                size, fresh = HEADER.unpack(conn.recv_bytes(HEADER.size))
                if fresh:
                    fd = recv_handle(conn)
                    try:
                        view = memoryview(mmap.mmap(fd, 0, prot=mmap.PROT_READ))
                    finally:
                        os.close(fd)
            except (EOFError, OSError, struct.error):  # that worker exited, or sent what no worker sends
                return
            try:
                if view is None or size > len(view):
                    raise ValueError(f"an entry of {size} bytes, past the buffer it was said to be in")
                write(view[:size])
                reply = b""
            except Exception as e:  # the worker counts it as a failed store, as it would its own
                log.exception("a store write failed")
                reply = repr(e).encode()
            try:
                conn.send_bytes(reply)
            except OSError:
                return


class WriterLink:
    """A worker's connection to the store writer, used by its one store-writer thread, and the buffer it
    assembles entries in: a memory file the store writer maps too."""

    def __init__(self, address: str, authkey: bytes) -> None:
        self.address, self._key = address, authkey
        self._conn: Connection | None = None
        self._down_until = 0.0
        self._fd = -1
        self._buffer: mmap.mmap | None = None
        self._shared = False  # whether the store writer has mapped the buffer

    def buffer(self, size: int) -> memoryview:
        """Room for an entry of `size` bytes, shared with the store writer."""
        if self._buffer is None or len(self._buffer) < size:
            self._retire_buffer()
            fd = os.memfd_create("warn-store-entry", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                self._buffer = mmap.mmap(fd, size)
            except OSError:
                os.close(fd)
                raise
            self._fd = fd
        return memoryview(self._buffer)

    def _retire_buffer(self) -> None:
        """The next entry goes to a new buffer (the store writer may still be reading this one)."""
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._buffer, self._shared = -1, None, False  # mapped until no view of it is left

    def write(self, message: memoryview) -> None:
        """Has the store writer write `message`, the first bytes of `buffer()`; OSError, EOFError or
        TimeoutError where it did not take it."""
        if self._conn is None:
            if time.monotonic() < self._down_until:
                raise ConnectionError("the store writer's process is away")
            try:
                self._conn = Client(self.address, "AF_UNIX", authkey=self._key)
            except (OSError, EOFError) as e:
                self._down(e)
                raise
            self._shared = False
        conn = self._conn
        try:
            conn.send_bytes(HEADER.pack(len(message), not self._shared))
            if not self._shared:
                send_handle(conn, self._fd, 0)
                self._shared = True
            if not conn.poll(REPLY_TIMEOUT_S):
                raise TimeoutError(f"no answer in {REPLY_TIMEOUT_S:.0f} s")
            reply = conn.recv_bytes()
        except (OSError, EOFError, TimeoutError) as e:
            self._conn = None  # a late answer must not be read as the next write's
            conn.close()
            self._retire_buffer()
            self._down(e)
            raise
        if reply:
            raise RuntimeError(f"the store writer failed this write: {reply.decode(errors='replace')}")

    def _down(self, e: BaseException) -> None:
        log.warning("the store writer's process is away (%r): this worker writes its predictions itself", e)
        self._down_until = time.monotonic() + RETRY_AFTER_S

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._retire_buffer()

    @classmethod
    def from_env(cls) -> WriterLink | None:
        if (peer := peer_from_env(ADDRESS_ENV, KEY_ENV)) is None or not available():
            return None
        address, key = peer
        if not key:
            log.warning("%s is set, but %s is not the store writer's key in hex: writing here", ADDRESS_ENV, KEY_ENV)
            return None
        return cls(address, key)


class StoreWriter(Child):
    """Started by `python -m service` before its workers, where they share a disk store."""

    def __init__(self, startup_timeout_s: float = 60) -> None:
        super().__init__(serve, "the store writer", ADDRESS_ENV, KEY_ENV, startup_timeout_s)
