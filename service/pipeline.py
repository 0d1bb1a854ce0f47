"""The request path, wired once per process: bytes -> image -> tensor -> (batched) session -> outputs.

Each stage lives in the module named after it: `decode` (bytes -> image), `preprocess` (image ->
tensor), `batcher` and `model` (tensor -> outputs), `response` (outputs -> JSON), `overlay`
(outputs -> PNG) and `store` (predictions kept for their overlay URLs).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from service import overlay, threads
from service.batcher import MicroBatcher, Outputs
from service.config import Settings
from service.decode import Need, decode, pixels_to_decode
from service.errors import ModelLoadError, ModelUnavailable, StoreUnavailable
from service.metrics import Metrics
from service.model import ModelInfo, OnnxModel
from service.overlay_cache import OverlayCache
from service.preprocess import Geometry, fit, to_input
from service.shared_session import RemoteModel
from service.store import DiskStore, MemoryStore, PredictionStore, RedisStore, StoredPrediction, key_time

log = logging.getLogger("service")
T = TypeVar("T")
# After a store write fails, predictions skip the store this long, then one tries it again while the rest
# skip it until that one has its answer. A store that is down or hung otherwise held every answer waiting
# for its write (past STORE_PENDING_WRITES): 161 req/s fell to 2.4.
STORE_RETRY_S = 5.0
# A worker of uvicorn's supervisor whose own session has been on one run this many times MODEL_TIMEOUT_S exits
# with this code, and the supervisor starts another in its place.
HUNG_RUN_TIMEOUTS, HUNG_EXIT_CODE = 2, 70
RESTARTING = "the shared session's process is being restarted; retry shortly"


@dataclass
class Classified:
    """One image's outputs (batch dimension removed), with where it came from."""

    outputs: dict[str, np.ndarray]
    geometry: Geometry
    image: Image.Image  # as decoded, at most the overlay side the request asked for
    timings_ms: dict[str, float]


def shrunk(data: bytes, side: int, settings: Settings, need: Need | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """An upload decoded with its longest side in (side/2, side] (or smaller where it is), and its original
    (EXIF-oriented) size. JPEGs decode at a power-of-two scale: asking for just over side/2 lands there."""
    d = decode(data, settings.MAX_IMAGE_PIXELS, settings.ALPHA_BACKGROUND, need or Need(side // 2 + 1))
    return fit(d.image, side), (d.width, d.height)


def need_for(side: int, input_size: tuple[int, int], settings: Settings) -> Need:
    """What `prepare` decodes for an overlay of `side` (0: none) and the model input.

    The model's input is resized from at least twice its size: decoded any smaller (a JPEG at 1/8 scale),
    the answers of the default model moved (`python -m bench.scales`)."""
    least = 2 * max(input_size)
    return Need(max(side // 2 + 1, least), least if settings.RESIZE == "stretch" else 0)


def prepare(
    data: bytes, side: int, input_size: tuple[int, int], settings: Settings
) -> tuple[Image.Image, np.ndarray, Geometry]:
    """Bytes to the image an overlay is drawn on (longest side in (side/2, side]; when `side` is 0, as
    small as the model allows) and the model input made from it."""
    img, original = shrunk(data, max(side, 4 * max(input_size)), settings, need_for(side, input_size, settings))
    x, geometry = to_input(img, input_size, settings.RESIZE, original)
    return fit(img, side) if side else img, x, geometry


def may_run_alone(model: OnnxModel | RemoteModel) -> bool:
    """Whether a lone request may run the model in its decoding thread: not where this process runs it on
    CUDA, whose provider keeps cuDNN and cuBLAS handles per calling thread, so runs stay on the batcher's one
    thread. A shared session's worker only sends its batch over a socket."""
    return isinstance(model, RemoteModel) or model.info.providers[0] != "CUDAExecutionProvider"


def make_store(settings: Settings) -> PredictionStore:
    s = settings
    if s.STORE == "redis":
        return RedisStore(s.REDIS_URL, s.STORE_MAX_ITEMS, s.STORE_TTL_S)
    if s.STORE == "disk":  # without a directory (one process on its own): a temporary one of its own
        return DiskStore(
            s.STORE_DIR,
            s.STORE_MAX_ITEMS,
            s.STORE_TTL_S,
            s.STORE_MAX_BYTES,
            temporary=s.STORE_DIR is None,
        )
    return MemoryStore(s.STORE_MAX_ITEMS, s.STORE_TTL_S, s.STORE_MAX_BYTES)


class Runtime:
    """What the routes need, built once in the app's lifespan."""

    def __init__(self, settings: Settings, metrics: Metrics, store: PredictionStore | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        try:
            # set by `python -m service` when the workers share a session
            remote = RemoteModel.from_env(settings.MODEL_TIMEOUT_S)
        except ModelUnavailable as e:
            raise ModelLoadError(str(e)) from e
        self.model: OnnxModel | RemoteModel = remote or OnnxModel.from_settings(settings)
        self.info: ModelInfo = self.model.info
        self.runs_alone = may_run_alone(self.model)
        self.store = store or make_store(settings)
        self.batcher = MicroBatcher(
            self.model.run,
            settings.MAX_BATCH_SIZE,
            settings.MAX_WAIT_MS,
            settings.QUEUE_SIZE,
            on_batch=metrics.observe_batch,
            on_depth=metrics.observe_depth,
            timeout_s=settings.MODEL_TIMEOUT_S,
        )
        # Decodes at once per worker: more only thrash its cores, and each holds a decoded image in memory.
        self.decoders = threads.pool(settings.decode_threads(), "decode")
        self.writes: dict[str, asyncio.Task[bool]] = {}  # stores still under way, by prediction id
        self.store_down_until = 0.0  # time.monotonic(): until then, predictions are not stored (0: store up)
        self.store_trial: asyncio.Task[bool] | None = None  # the write that tries a failed store again
        self.watchdog: asyncio.Task[None] | None = None  # exit_if_hung, in a worker of uvicorn's supervisor
        self.overlays = OverlayCache(settings.OVERLAY_CACHE_BYTES)
        self.encoding = overlay.Encoding(settings.OVERLAY_PNG_COMPRESSION, settings.OVERLAY_QUALITY)

    async def start(self) -> None:
        if isinstance(self.store, RedisStore):
            try:
                await self.store.ping()
            except Exception as e:
                raise ModelLoadError(f"cannot reach the Redis store at {self.settings.REDIS_URL}: {e}") from e
        self.batcher.start()
        if isinstance(self.model, OnnxModel) and multiprocessing.parent_process() is not None:
            self.watchdog = asyncio.create_task(self.exit_if_hung(), name="hung-run-watchdog")

    async def exit_if_hung(self) -> None:
        """A run cannot be interrupted, and a worker whose own session is on a hung one (a GPU that stopped
        answering) refuses every prediction until it ends. Past HUNG_RUN_TIMEOUTS times MODEL_TIMEOUT_S the worker
        gives up."""
        limit = HUNG_RUN_TIMEOUTS * self.settings.MODEL_TIMEOUT_S
        while self.batcher.running_for() <= limit:
            await asyncio.sleep(min(1.0, limit / 4))
        self.give_up_on_hung_run(f"{HUNG_RUN_TIMEOUTS} times WARN_MODEL_TIMEOUT_S")

    def give_up_on_hung_run(self, why: str) -> None:
        """os._exit: a clean exit would wait for the hung run's thread."""
        log.error(
            "this worker's session has been on one run for %.0f s, %s: the worker exits (code %d) without waiting "
            "for it",
            self.batcher.running_for(),
            why,
            HUNG_EXIT_CODE,
        )
        os._exit(HUNG_EXIT_CODE)

    async def stop(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            # A run still going is waited for until it counts as hung; stopping would then wait for it, and the
            # supervisor for this worker, for good.
            while 0 < self.batcher.running_for() and not self.batcher.stalled():
                await asyncio.sleep(0.05)
            if self.batcher.stalled():
                self.give_up_on_hung_run("and the worker is asked to stop")
        await self.batcher.stop()
        if self.writes:  # answered ids stay fetchable, unless the store hangs
            await asyncio.wait(list(self.writes.values()), timeout=self.settings.SHUTDOWN_TIMEOUT_S)
        await self.store.close()
        self.decoders.shutdown(wait=False, cancel_futures=True)

    def unready(self) -> str | None:
        """Why the model cannot take requests now, or None where it can."""
        return self.batcher.stalled() if self.model.serving() else RESTARTING

    def prepare(self, data: bytes, side: int = 0) -> tuple[Image.Image, np.ndarray, Geometry]:
        return prepare(data, side, self.info.input_size, self.settings)

    async def in_decoder(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in one of the decoding threads. Work beyond them waits in the pool's queue (bounded by
        admission), and queued work whose request is cancelled never runs."""
        return await asyncio.get_running_loop().run_in_executor(self.decoders, fn, *args)

    def pixels_to_prepare(self, images: Iterable[bytes]) -> int:
        """The pixels `prepare` decodes for these images (side 0: the model input alone), from their headers."""
        need = need_for(0, self.info.input_size, self.settings)
        return sum(pixels_to_decode(data, self.settings.MAX_IMAGE_PIXELS, need) for data in images)

    async def decode(self, data: bytes, side: int = 0) -> tuple[Image.Image, np.ndarray, Geometry]:
        """`prepare` in a decoding thread."""
        return await self.in_decoder(self.prepare, data, side)

    def _prepare_and_run_alone(
        self, data: bytes, side: int
    ) -> tuple[Image.Image, np.ndarray, Geometry, float, Outputs | None]:
        """`prepare`, then the run where the request is alone (`MicroBatcher.run_alone`), and when decoding ended."""
        img, x, geometry = self.prepare(data, side)
        decoded = time.perf_counter()
        return img, x, geometry, decoded, self.batcher.run_alone(x[None]) if self.runs_alone else None

    async def classify(self, data: bytes, overlay_side: int = 0) -> Classified:
        """Decode and run one image; `overlay_side` is the longest side an overlay will be drawn at. A request
        alone in this worker runs in its decoding thread; others are batched."""
        async with self.batcher.admit():  # a full queue refuses here, before any decoding
            started = time.perf_counter()
            img, x, geometry, decoded, outputs = await self.in_decoder(self._prepare_and_run_alone, data, overlay_side)
            if outputs is None:
                outputs = await self.batcher.submit_admitted(x[None])
            done = time.perf_counter()
        self.metrics.stages.labels("decode").observe(decoded - started)
        self.metrics.stages.labels("model").observe(done - decoded)
        row = {k: v[0] for k, v in outputs.items()}
        timings = {"decode_ms": (decoded - started) * 1e3, "inference_ms": (done - decoded) * 1e3}
        return Classified(row, geometry, img, timings)

    def snapshot(self, c: Classified, result: dict[str, Any], upload: bytes | None = None) -> StoredPrediction:
        """What an overlay needs of a prediction: references, no copies, so cheap on the event loop (a store
        copies them out when it serializes them, off the loop and after the answer). With `upload`, the
        image is kept as uploaded, and decoded only if an overlay is drawn."""
        attended = range(self.info.attended_layers)
        return StoredPrediction(
            result=result,
            masks=[c.outputs[f"attention_{i}"] for i in attended],
            maps=[c.outputs[f"attention_map_{i}"] for i in attended],
            combined=c.outputs["attention_combined"],
            content=c.geometry.content,
            image=c.image if upload is None else upload,
        )

    def kept_upload(self, data: bytes) -> bytes | None:
        """`data`, where a stored prediction keeps the upload for its overlays rather than decoded pixels:
        a JPEG (its DCT scaling makes decoding for the model alone cheaper; any other format is decoded in
        full either way, so its pixels are kept and its overlays spared a second decode), and no larger
        than the pixels of an overlay-sized image, so that no entry holds more than those (3 MiB at 1024)."""
        side = self.settings.STORE_IMAGE_MAX_SIZE
        return data if data[:3] == b"\xff\xd8\xff" and len(data) <= 3 * side * side else None

    async def remember(self, key: str, c: Classified, result: dict[str, Any], upload: bytes | None) -> bool:
        """Store a prediction for its overlay URLs, with the image as uploaded (or as decoded, without
        `upload`). The write finishes after the answer is sent, unless `STORE_PENDING_WRITES` are already
        under way: then this request waits for its own.

        False where the prediction will not be stored: a write failed in the last STORE_RETRY_S, or since
        then another is trying the store again, or this one failed while its request waited for it."""
        trial = bool(self.store_down_until)
        if trial and (time.monotonic() < self.store_down_until or self.store_trial is not None):
            return False
        write = asyncio.create_task(self._write(key, self.snapshot(c, dict(result), upload)))  # the caller adds timings
        self.writes[key] = write
        write.add_done_callback(lambda _: self.writes.pop(key, None))
        if trial:
            self.store_trial = write
            write.add_done_callback(lambda _: setattr(self, "store_trial", None))
        if len(self.writes) > self.settings.STORE_PENDING_WRITES:
            return await asyncio.shield(write)  # a client that gives up does not cancel the write
        return True

    async def _write(self, key: str, stored: StoredPrediction) -> bool:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.STORE_TIMEOUT_S):
                await self.store.put(key, stored)  # the store's one hop off the loop, if any
        except Exception as e:  # where the answer is out, its URLs will answer 404
            self.store_down_until = time.monotonic() + STORE_RETRY_S
            self.metrics.store_failures.inc()
            log.warning(
                "storing prediction %s failed: %r; predictions are answered without overlay URLs for %g s",
                key,
                e,
                STORE_RETRY_S,
            )
            return False
        self.store_down_until = 0.0
        self.metrics.store_writes.observe(time.perf_counter() - started)
        return True

    async def _get(self, key: str) -> StoredPrediction | None:
        try:
            async with asyncio.timeout(self.settings.STORE_TIMEOUT_S):
                return await self.store.get(key)
        except (TimeoutError, OSError, *self.store.unavailable) as e:
            log.warning("reading prediction %s failed: %r", key, e)
            raise StoreUnavailable(f"the prediction store did not answer ({type(e).__name__}); retry shortly") from None

    async def find(self, key: str) -> StoredPrediction | None:
        """A stored prediction. An id made in the last `STORE_WRITE_WAIT_S` seconds may still be being
        written, by this worker or another, so a miss is retried until then."""
        if (write := self.writes.get(key)) is not None:
            await asyncio.shield(write)
            return await self._get(key)  # written, or failed: nothing left to wait for
        stored = await self._get(key)
        made = key_time(key)
        if stored is not None or made is None or made > time.time() + 1:  # 1 s: clock skew between hosts
            return stored
        deadline = made + self.settings.STORE_WRITE_WAIT_S
        pause = 0.002
        while stored is None and (left := deadline - time.time()) > 0:
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 0.1)
            stored = await self._get(key)
        return stored

    def picture(self, upload: bytes) -> Image.Image:
        """A kept upload decoded as `/v1/predict` with an overlay would have decoded it."""
        return shrunk(upload, self.settings.STORE_IMAGE_MAX_SIZE, self.settings)[0]

    def render(self, stored: StoredPrediction, picture: Image.Image | None, p: overlay.OverlayParams) -> bytes:
        """`picture`: the decoded upload, or None where `stored` holds the pixels."""
        return overlay.draw(stored, picture or stored.picture(), p, self.info.input_size, self.encoding)

    async def overlay(self, key: str, stored: StoredPrediction, p: overlay.OverlayParams) -> bytes:
        """A stored prediction's overlay, rendered off the event loop once per parameter set. A kept upload
        is decoded once for every overlay of it (while the cache holds it), in a decoding thread."""
        cached = self.overlays.get((key, p))
        if cached is None:
            picture = None
            if (upload := stored.encoded) is not None and (picture := self.overlays.get(key)) is None:
                picture = await self.in_decoder(self.picture, upload)
                self.overlays.put(key, picture, 3 * picture.width * picture.height)
            cached = await self.in_decoder(self.render, stored, picture, p)
            self.overlays.put((key, p), cached)
        return cached
