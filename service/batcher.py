"""Dynamic micro-batching: concurrent requests share one session.run, off the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service.errors import Overloaded

Outputs = dict[str, np.ndarray]


class MicroBatcher:
    """Gathers requests for up to `max_wait_ms` or until `max_batch` rows, runs them as one batch.

    A request is an (n, ...) array; it gets back each output's n rows. The queue holds at most
    `queue_size` requests: past that, `submit` raises Overloaded at once instead of growing memory.
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], Outputs],
        max_batch: int,
        max_wait_ms: float,
        queue_size: int,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._run = run
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[Outputs]]] = asyncio.Queue(queue_size)
        self._on_batch = on_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    async def submit(self, x: np.ndarray) -> Outputs:
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((x, future))
        except asyncio.QueueFull:
            raise Overloaded(
                f"the model's queue is full ({self.queue.maxsize} requests waiting); retry shortly"
            ) from None
        return await future

    async def _gather(self) -> list[tuple[np.ndarray, asyncio.Future[Outputs]]]:
        items = [await self.queue.get()]
        rows = len(items[0][0])
        deadline = time.perf_counter() + self.max_wait
        while rows < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                await asyncio.sleep(min(left, 0.0005))
                continue
            items.append(item)
            rows += len(item[0])
        return items

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._gather()
            items = [(x, f) for x, f in items if not f.done()]  # callers that gave up
            if not items:
                continue
            batch = items[0][0] if len(items) == 1 else np.concatenate([x for x, _ in items])
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, batch)
            except Exception as e:  # one bad batch fails its own requests, never the loop
                for _, f in items:
                    if not f.done():
                        f.set_exception(e)
                continue
            if self._on_batch:
                self._on_batch(len(batch), time.perf_counter() - started)
            start = 0
            for x, f in items:
                n = len(x)
                if not f.done():
                    f.set_result({k: v[start : start + n] for k, v in outputs.items()})
                start += n
