"""One onnxruntime session for every worker of `python -m service` (WARN_SHARED_SESSION; on by default where the
workers would run on a GPU).

With a session per worker, a GPU host holds a copy of the model and a CUDA context per worker (16
workers of the default model: 12 GB), and each worker's small batches reach the GPU one by one. Here one
process of its own holds the only session. Each worker sends its batch over a Unix socket, and that
process runs what every worker sent while its run threads were busy as one batch (up to MAX_BATCH_SIZE rows,
padded to that many on CUDA: see CUDA_FIXED_BATCH), SHARED_SESSION_RUNS of them at once. On an H100, padded
to 16 rows and one run at a time, it served 1,856-1,909 req/s at 64 connections; a session per worker,
padded to 4, 8 or 32 rows, 1,080-1,440 (README, "On a GPU host").

The socket lives in a directory only this user may enter, and a peer must prove the run's random
key (multiprocessing's HMAC handshake) before anything it sends is unpickled (service/children.py).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener, wait
from pathlib import Path

import numpy as np
from prometheus_client import Histogram

from service import threads
from service.batcher import split
from service.children import Child, as_child_of_the_service, peer_from_env
from service.config import Settings
from service.errors import ModelLoadError, ModelUnavailable
from service.logs import show_service_logs
from service.metrics import LATENCY_BUCKETS
from service.model import ModelInfo, OnnxModel

log = logging.getLogger("service.shared_session")

ADDRESS_ENV, KEY_ENV = "WARN_SESSION_ADDRESS", "WARN_SESSION_KEY"
PROCESS_NAME = b"warn-session"  # what ps, top and /proc/<pid>/comm show for it
# A worker waits this much longer than MODEL_TIMEOUT_S for an answer, by when the process, finding its run past
# MODEL_TIMEOUT_S, has exited to be restarted; past it, the process is taken to be hung all the same.
REPLY_GRACE_S = 10.0


@dataclass
class Failed:
    """The answer to every batch of a run that raised."""

    message: str


Pending = tuple[Connection, np.ndarray]


class Runner:
    """Runs the batches every connection sent as shared runs, each connection's rows answered to it."""

    def __init__(self, run, max_batch: int, on_batch=None) -> None:
        self._run = run
        self.max_batch = max_batch
        self.pending: deque[Pending] = deque()
        self._on_batch = on_batch

    def take(self) -> list[Pending]:
        """The oldest batch, and the ones after it while they fit `max_batch` rows."""
        items = [self.pending.popleft()]
        rows = len(items[0][1])
        while self.pending and rows + len(self.pending[0][1]) <= self.max_batch:
            items.append(self.pending.popleft())
            rows += len(items[-1][1])
        return items

    def run(self, items: list[Pending]) -> None:
        """One shared run of `items`, each connection answered with its own rows (or why the run failed)."""
        started = time.perf_counter()
        try:
            batch = items[0][1] if len(items) == 1 else np.concatenate([x for _, x in items])
            outputs = self._run(batch)
        except Exception as e:  # one bad run fails its own batches; the process goes on
            log.exception("shared session run failed")
            for conn, _ in items:
                answer(conn, Failed(f"inference failed: {e}"))
            return
        if self._on_batch:
            self._on_batch(len(batch), time.perf_counter() - started)
        for (conn, _), rows in zip(items, split(outputs, [len(x) for _, x in items])):
            answer(conn, rows)


def answer(conn: Connection, reply: object) -> None:
    try:
        conn.send(reply)
    except OSError:  # that worker is gone
        pass


def accept(listener: Listener, info: ModelInfo, arrived: queue.SimpleQueue[Connection], wake: socket.socket) -> None:
    """Admits workers (the key handshake), each told the model's description, and wakes the loop."""
    while True:
        try:
            conn = listener.accept()
            conn.send(info)
        except Exception as e:  # a peer without the key, or one that hung up mid-handshake
            log.warning("refused a connection to the shared session: %r", e)
            continue
        arrived.put(conn)
        wake.send(b"\0")


def watch_runs(started: dict[int, float], limit_s: float, give_up: Callable[[float], None]) -> None:
    """Calls `give_up(seconds)` once a run in `started` (its time.monotonic() start, by run thread) has gone on
    for longer than `limit_s`."""
    while True:
        time.sleep(min(1.0, max(0.05, limit_s / 4)))
        oldest = min(started.copy().values(), default=None)  # a copy: run threads add and remove theirs
        if oldest is not None and (took := time.monotonic() - oldest) > limit_s:
            give_up(took)
            return


def serve_connections(
    listener: Listener,
    info: ModelInfo,
    runner: Runner,
    runs: int = 2,
    stall_s: float | None = None,
    give_up: Callable[[float], None] | None = None,
) -> None:
    """One thread reads every worker's connection and hands what arrived to a free one of `runs` run threads,
    so the next run is stacked, and the last one answered, while one is on the GPU (SHARED_SESSION_RUNS).
    (A reader thread per worker took twice as long a round trip on 2 cores.) A run past `stall_s` calls
    `give_up` with its seconds so far."""
    started: dict[int, float] = {}
    if stall_s is not None and give_up is not None:
        watch = threading.Thread(target=watch_runs, args=(started, stall_s, give_up), daemon=True, name="session-watch")
        watch.start()
    wake, woken = socket.socketpair()
    arrived: queue.SimpleQueue[Connection] = queue.SimpleQueue()
    threading.Thread(target=accept, args=(listener, info, arrived, wake), daemon=True, name="session-accept").start()
    free = threading.Semaphore(runs)
    running = threads.pool(runs, "session-run")
    answered: queue.SimpleQueue[list[Connection]] = queue.SimpleQueue()

    def run(items: list[Pending]) -> None:
        me = threading.get_ident()
        started[me] = time.monotonic()
        try:
            runner.run(items)
        finally:
            del started[me]
            answered.put([conn for conn, _ in items])
            free.release()
            wake.send(b"\0")  # batches may be waiting for this run thread

    conns: list[Connection] = []
    # Connections whose batch is not answered yet. A worker sends nothing more until then, so they are not read,
    # and one that hung up is closed only after its answer failed: never while a run thread may write to it.
    waiting: set[Connection] = set()
    while True:
        for ready in wait([woken, *(c for c in conns if c not in waiting)]):
            if ready is woken:
                woken.recv(4096)
                while not arrived.empty():
                    conns.append(arrived.get())
                while not answered.empty():
                    waiting.difference_update(answered.get())
                continue
            try:
                runner.pending.append((ready, ready.recv()))
                waiting.add(ready)
            except (EOFError, OSError):  # that worker exited
                conns.remove(ready)
                ready.close()
        while runner.pending and free.acquire(blocking=False):
            running.submit(run, runner.take())


def serve(address: str, authkey: bytes) -> None:
    """The shared session's process: loads the model, then listens at `address` (its existence says ready)."""
    show_service_logs()
    as_child_of_the_service(PROCESS_NAME)
    s = Settings()
    try:
        model = OnnxModel.from_settings(s)  # a worker's share of threads, unpinned: the workers decode on every core
    except ModelLoadError as e:
        log.error("cannot start the shared session: %s", e)
        sys.exit(1)
    sizes = Histogram(
        "warn_shared_session_batch_size",
        "Images per session.run of the shared session (every worker's batches together)",
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    )
    seconds = Histogram(
        "warn_shared_session_inference_duration_seconds", "session.run time per shared batch", buckets=LATENCY_BUCKETS
    )

    def observe(size: int, took: float) -> None:
        sizes.observe(size)
        seconds.observe(took)

    def give_up(took: float) -> None:
        """A hung run (a GPU that stopped answering) cannot be interrupted, only its process ended: the launcher
        starts another, and the workers' batches fail at once rather than at their deadlines."""
        log.error(
            "a shared run has gone on for %.0f s, past WARN_MODEL_TIMEOUT_S (%g s): restarting the shared session",
            took,
            s.MODEL_TIMEOUT_S,
        )
        os._exit(70)  # EX_SOFTWARE; SIGTERM would wait for the run

    serve_connections(
        Listener(address, "AF_UNIX", authkey=authkey),
        model.info,
        Runner(model.run, s.MAX_BATCH_SIZE, observe),
        s.SHARED_SESSION_RUNS,
        s.MODEL_TIMEOUT_S,
        give_up,
    )


class RemoteModel:
    """The shared session as a worker's batcher sees it: `info`, `output_names` and a blocking `run`."""

    def __init__(self, address: str, authkey: bytes, reply_timeout_s: float = 60.0) -> None:
        self.address, self._key = address, authkey
        self.reply_timeout_s = reply_timeout_s
        self._conn: Connection | None = None
        self.info = self._connect()
        self.output_names = [o.name for o in self.info.outputs]

    def _connect(self) -> ModelInfo:
        try:
            conn = Client(self.address, "AF_UNIX", authkey=self._key)
            info = conn.recv()
        except (OSError, EOFError) as e:
            raise ModelUnavailable(f"the shared session's process is not answering ({e!r}); retry shortly") from e
        self._conn = conn
        return info

    def serving(self) -> bool:
        """Whether the session's process is there to run a batch: its socket exists from when the model is
        loaded, and goes when the launcher replaces a process that died."""
        return Path(self.address).exists()

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The batcher runs one batch at a time (its own, or a lone request's), so one at most is in flight
        per worker."""
        if self._conn is None:
            self._connect()  # the process was restarted
        conn = self._conn
        try:
            conn.send(batch)
            if not conn.poll(self.reply_timeout_s):
                raise TimeoutError(f"no answer in {self.reply_timeout_s:.0f} s")
            reply = conn.recv()
        except (OSError, EOFError, TimeoutError) as e:
            self._conn = None  # a late answer must not be read as the next batch's
            conn.close()
            raise ModelUnavailable(f"the shared session's process failed this batch ({e!r}); retry shortly") from e
        if isinstance(reply, Failed):
            raise RuntimeError(reply.message)
        return reply

    @classmethod
    def from_env(cls, model_timeout_s: float = 30.0) -> RemoteModel | None:
        if (peer := peer_from_env(ADDRESS_ENV, KEY_ENV)) is None:
            return None
        address, key = peer
        if not key:
            raise ModelUnavailable(f"{ADDRESS_ENV} is set, but {KEY_ENV} is not the session's key in hex")
        return cls(address, key, model_timeout_s + REPLY_GRACE_S)


class SharedSession(Child):
    """Started by `python -m service` before its workers: the process, restarted should it die."""

    def __init__(self, startup_timeout_s: float = 300) -> None:
        super().__init__(serve, "the shared session", ADDRESS_ENV, KEY_ENV, startup_timeout_s, ModelLoadError)
