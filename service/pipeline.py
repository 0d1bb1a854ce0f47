"""The request path, wired once per process: bytes -> image -> tensor -> (batched) session -> outputs.

Each stage lives in the module named after it: `decode` (bytes -> image), `preprocess` (image ->
tensor), `batcher` and `model` (tensor -> outputs), `response` (outputs -> JSON), `overlay`
(outputs -> PNG) and `store` (predictions kept for their overlay URLs).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool

from service import overlay
from service.batcher import MicroBatcher
from service.config import Settings
from service.decode import Need, decode
from service.errors import ModelLoadError, ModelUnavailable
from service.metrics import Metrics
from service.model import ModelInfo, OnnxModel
from service.overlay_cache import OverlayCache
from service.preprocess import Geometry, fit, to_input
from service.shared_session import RemoteModel
from service.store import DiskStore, MemoryStore, PredictionStore, RedisStore, StoredPrediction, key_time

log = logging.getLogger("service")


@dataclass
class Classified:
    """One image's outputs (batch dimension removed), with where it came from."""

    outputs: dict[str, np.ndarray]
    geometry: Geometry
    image: Image.Image  # as decoded, at most the overlay side the request asked for
    timings_ms: dict[str, float]


def make_store(settings: Settings) -> PredictionStore:
    s = settings
    if s.STORE == "redis":
        return RedisStore(s.REDIS_URL, s.STORE_MAX_ITEMS, s.STORE_TTL_S)
    if s.STORE == "disk":  # without a directory (one process on its own): a temporary one of its own
        return DiskStore(
            s.STORE_DIR, s.STORE_MAX_ITEMS, s.STORE_TTL_S, s.STORE_MAX_BYTES, temporary=s.STORE_DIR is None
        )
    return MemoryStore(s.STORE_MAX_ITEMS, s.STORE_TTL_S, s.STORE_MAX_BYTES)


class Runtime:
    """What the routes need, built once in the app's lifespan."""

    def __init__(self, settings: Settings, metrics: Metrics, store: PredictionStore | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        try:
            remote = RemoteModel.from_env()  # set by `python -m service` when the workers share a session
        except ModelUnavailable as e:
            raise ModelLoadError(str(e)) from e
        self.model: OnnxModel | RemoteModel = remote or OnnxModel.from_settings(settings)
        self.info: ModelInfo = self.model.info
        self.store = store or make_store(settings)
        self.batcher = MicroBatcher(
            self.model.run,
            settings.MAX_BATCH_SIZE,
            settings.MAX_WAIT_MS,
            settings.QUEUE_SIZE,
            on_batch=metrics.observe_batch,
            on_depth=metrics.observe_depth,
        )
        # Decodes at once per worker: more only thrash its cores, and each holds a decoded image in memory.
        self.decoders = anyio.CapacityLimiter(settings.decode_threads())
        self.writes: dict[str, asyncio.Task[None]] = {}  # stores still under way, by prediction id
        self.overlays = OverlayCache(settings.OVERLAY_CACHE_BYTES)
        self.encoding = overlay.Encoding(settings.OVERLAY_PNG_COMPRESSION, settings.OVERLAY_QUALITY)

    async def start(self) -> None:
        if isinstance(self.store, RedisStore):
            try:
                await self.store.ping()
            except Exception as e:
                raise ModelLoadError(f"cannot reach the Redis store at {self.settings.REDIS_URL}: {e}") from e
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        if self.writes:  # answered ids stay fetchable, unless the store hangs
            await asyncio.wait(list(self.writes.values()), timeout=self.settings.SHUTDOWN_TIMEOUT_S)
        await self.store.close()

    def prepare(self, data: bytes, side: int = 0) -> tuple[Image.Image, np.ndarray, Geometry]:
        """Bytes to the image an overlay is drawn on (longest side in (side/2, side], or as small as the
        model allows when `side` is 0) and the model input made from it."""
        s, size = self.settings, self.info.input_size
        model_side = max(size)
        # JPEGs decode at a power-of-two scale; asking for just over side/2 lands the result in (side/2, side]
        need = Need(max(side // 2 + 1, model_side), model_side if s.RESIZE == "stretch" else 0)
        d = decode(data, s.MAX_IMAGE_PIXELS, s.ALPHA_BACKGROUND, need)
        img = fit(d.image, max(side, model_side * 2))
        x, geometry = to_input(img, size, s.RESIZE, (d.width, d.height))
        return img, x, geometry

    async def decode(self, data: bytes, side: int = 0) -> tuple[Image.Image, np.ndarray, Geometry]:
        """`prepare` in a decoding thread."""
        return await anyio.to_thread.run_sync(self.prepare, data, side, limiter=self.decoders)

    async def classify(self, data: bytes, overlay_side: int = 0) -> Classified:
        """Decode and run one image; `overlay_side` is the longest side an overlay will be drawn at."""
        with self.batcher.admit():  # a full queue refuses here, before any decoding
            started = time.perf_counter()
            img, x, geometry = await self.decode(data, overlay_side)
            decoded = time.perf_counter()
            outputs = await self.batcher.submit_admitted(x[None])
            done = time.perf_counter()
        row = {k: v[0] for k, v in outputs.items()}
        timings = {"decode_ms": (decoded - started) * 1e3, "inference_ms": (done - decoded) * 1e3}
        return Classified(row, geometry, img, timings)

    def snapshot(self, c: Classified, result: dict[str, Any]) -> StoredPrediction:
        """What an overlay needs of a prediction: references, no copies, so cheap on the event loop (a store
        copies the pixels out when it serializes them, off the loop and after the answer)."""
        attended = range(self.info.attended_layers)
        return StoredPrediction(
            result=result,
            masks=[c.outputs[f"attention_{i}"] for i in attended],
            maps=[c.outputs[f"attention_map_{i}"] for i in attended],
            combined=c.outputs["attention_combined"],
            content=c.geometry.content,
            image=c.image,
        )

    async def remember(self, key: str, c: Classified, result: dict[str, Any]) -> None:
        """Store a prediction for its overlay URLs. The write finishes after the answer is sent, unless
        `STORE_PENDING_WRITES` are already under way: then this request waits for its own."""
        write = asyncio.create_task(self._write(key, c, dict(result)))  # the caller adds its timings
        self.writes[key] = write
        write.add_done_callback(lambda _: self.writes.pop(key, None))
        if len(self.writes) > self.settings.STORE_PENDING_WRITES:
            await asyncio.shield(write)  # a client that gives up does not cancel the write

    async def _write(self, key: str, c: Classified, result: dict[str, Any]) -> None:
        try:
            await self.store.put(key, self.snapshot(c, result))  # the store's one hop off the loop, if any
        except Exception as e:  # the answer is out; its URLs will answer 404
            self.metrics.store_failures.inc()
            log.warning("storing prediction %s failed: %r", key, e)

    async def find(self, key: str) -> StoredPrediction | None:
        """A stored prediction. An id made in the last `STORE_WRITE_WAIT_S` seconds may still be being
        written, by this worker or another, so a miss is retried until then."""
        if (write := self.writes.get(key)) is not None:
            await asyncio.shield(write)
            return await self.store.get(key)  # written, or failed: nothing left to wait for
        stored = await self.store.get(key)
        made = key_time(key)
        if stored is not None or made is None or made > time.time() + 1:  # 1 s: clock skew between hosts
            return stored
        deadline = made + self.settings.STORE_WRITE_WAIT_S
        pause = 0.002
        while stored is None and (left := deadline - time.time()) > 0:
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 0.1)
            stored = await self.store.get(key)
        return stored

    def render(self, stored: StoredPrediction, p: overlay.OverlayParams) -> bytes:
        return overlay.draw(stored, p, self.info.input_size, self.encoding)

    async def overlay(self, key: str, stored: StoredPrediction, p: overlay.OverlayParams) -> bytes:
        """A stored prediction's overlay, rendered off the event loop once per parameter set."""
        cached = self.overlays.get((key, p))
        if cached is None:
            cached = await run_in_threadpool(self.render, stored, p)
            self.overlays.put((key, p), cached)
        return cached
