"""Dynamic micro-batching: concurrent requests share one session.run, off the event loop.

Greedy, never idle: when the model is free a request runs at once; while a batch runs, requests
queue, and the next batch takes everything queued (up to `max_batch` rows). With `max_wait_ms` above 0
(the service's default is 0), a batch also waits that long at most for admitted requests still being
decoded.
A request alone in its worker runs in the thread that decoded it (`run_alone`), skipping the hops
to the batcher's thread and back.

A request has `timeout_s` from its admission to its outputs. A run that goes on past that (a hung GPU or
session) leaves the batcher stalled: it admits nothing until the run ends, so a hung model refuses at
once rather than hold a queue of decoded tensors, each waiting out its deadline.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import numpy as np

from service import threads
from service.errors import ModelTimeout, ModelUnavailable, Overloaded

Outputs = dict[str, np.ndarray]
Item = tuple[np.ndarray, "asyncio.Future[Outputs]"]


def split(outputs: Outputs, sizes: list[int]) -> Iterator[Outputs]:
    """Each request's rows of a batch's outputs, in the order the requests were stacked."""
    start = 0
    for n in sizes:
        yield {k: v[start : start + n] for k, v in outputs.items()}
        start += n


class MicroBatcher:
    """Runs (n, ...) requests as batches of up to `max_batch` rows; each gets back its own n rows.

    Admission is counted before any work: `admit()` holds one of `queue_size` places from before a
    request is decoded until its answer is back, so a full service refuses with 503 at no cost.
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], Outputs],
        max_batch: int,
        max_wait_ms: float,
        queue_size: int,
        on_batch: Callable[[int, float], None] | None = None,
        on_depth: Callable[[int, int], None] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self._run = run
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.queue: asyncio.Queue[Item] = asyncio.Queue()  # bounded by admission, not here
        self.admitted = 0
        self._on_batch = on_batch
        self._on_depth = on_depth  # (queued, admitted), on every change
        self._executor = threads.pool(1, "inference")
        self._running = threading.Lock()  # one run at a time: a batch's, or a lone request's
        self._alone = 0  # 1 while a lone request runs in its decoding thread: admitted, yet not decoding
        self._run_started: float | None = None  # time.monotonic() of the run in progress, if any
        self._task: asyncio.Task[None] | None = None
        self._carry: Item | None = None  # a request that did not fit the last batch

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def _report(self) -> None:
        if self._on_depth:
            self._on_depth(self.queue.qsize(), self.admitted)

    def running_for(self) -> float:
        """Seconds the run in progress (a batch's, or a lone request's) has taken so far; 0 when none runs."""
        started = self._run_started
        return 0.0 if started is None else time.monotonic() - started

    def stalled(self) -> str | None:
        """Why the batcher admits nothing now, where the run in progress has gone on past `timeout_s` (everyone it
        was for has given up); else None."""
        if self.timeout_s is None or (took := self.running_for()) <= self.timeout_s:
            return None
        return f"the model has not finished its current run in {took:.0f} s"

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold a place for one request (decode + inference) for at most `timeout_s`, or refuse at once: a full
        queue raises Overloaded, a stalled model ModelUnavailable; past the deadline, ModelTimeout."""
        if why := self.stalled():
            raise ModelUnavailable(f"{why}; retry shortly")
        if self.admitted >= self.queue_size:
            raise Overloaded(f"the model's queue is full ({self.queue_size} requests in progress); retry shortly")
        self.admitted += 1
        self._report()
        try:
            async with asyncio.timeout(self.timeout_s) as deadline:
                yield
        except TimeoutError:
            if not deadline.expired():
                raise
            raise ModelTimeout(
                f"no answer from the model within {self.timeout_s:g} s of this request's admission "
                f"(the model is hung, or far behind); retry later"
            ) from None
        finally:
            self.admitted -= 1
            self._report()

    async def submit(self, x: np.ndarray) -> Outputs:
        async with self.admit():
            return await self.submit_admitted(x)

    async def submit_admitted(self, x: np.ndarray) -> Outputs:
        """Submit for a request that already holds a place from `admit()`."""
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((x, future))
        self._report()
        return await future

    def run_alone(self, x: np.ndarray) -> Outputs | None:
        """Run `x` in the calling thread (a decoding thread) where its request is the only one admitted and
        no batch is running; None otherwise, and the caller submits it. Nothing else is queued or being
        decoded then, so no batch would have formed."""
        if self.admitted != 1 or not self._running.acquire(blocking=False):
            return None
        self._alone = 1
        try:
            started = time.perf_counter()
            outputs = self._timed_run(x)
        finally:
            self._alone = 0
            self._running.release()
        if self._on_batch:
            self._on_batch(len(x), time.perf_counter() - started)
        return outputs

    def _run_batch(self, xs: list[np.ndarray]) -> Outputs:
        """Stacked here, in the batcher's thread: on the event loop, numpy's copy gave the GIL up and waited
        to get it back behind the decoding threads."""
        batch = xs[0] if len(xs) == 1 else np.concatenate(xs)
        with self._running:
            return self._timed_run(batch)

    def _timed_run(self, batch: np.ndarray) -> Outputs:
        """`run`, its start kept for `running_for` (one run at a time: the caller holds `_running`)."""
        self._run_started = time.monotonic()
        try:
            return self._run(batch)
        finally:
            self._run_started = None

    def _take(self, items: list[Item], rows: int, item: Item | None = None) -> int:
        """Add `item`, then queued requests, to `items` while they fit `max_batch`; returns the row count.

        The first that does not fit waits in `_carry` for the next batch.
        """
        while rows < self.max_batch:
            if item is None:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
            if rows + len(item[0]) > self.max_batch:
                self._carry = item
                break
            items.append(item)
            rows += len(item[0])
            item = None
        return rows

    async def _gather(self) -> list[Item]:
        if self._carry is not None:
            first, self._carry = self._carry, None
        else:
            first = await self.queue.get()
        items = [first]
        rows = self._take(items, len(first[0]))
        deadline = time.perf_counter() + self.max_wait
        while rows < self.max_batch and self._carry is None:
            left = deadline - time.perf_counter()
            decoding = self.admitted - len(items) - self.queue.qsize() - self._alone
            if left <= 0 or decoding <= 0:
                break
            try:
                item = await asyncio.wait_for(self.queue.get(), left)
            except TimeoutError:
                break
            rows = self._take(items, rows, item)
        return items

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [(x, f) for x, f in await self._gather() if not f.done()]  # callers that gave up
            self._report()
            if not items:
                continue
            xs = [x for x, _ in items]
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self._run_batch, xs)
            except Exception as e:  # one bad batch fails its own requests, never the loop
                for _, f in items:
                    if not f.done():
                        f.set_exception(e)
                continue
            sizes = [len(x) for x in xs]
            if self._on_batch:
                self._on_batch(sum(sizes), time.perf_counter() - started)
            for (_, f), rows in zip(items, split(outputs, sizes)):
                if not f.done():
                    f.set_result(rows)
