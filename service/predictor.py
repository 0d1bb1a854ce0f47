"""The request pipeline: bytes -> image -> input tensor -> (batched) session -> outputs -> JSON / PNG."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool

from service import overlay
from service.batcher import MicroBatcher
from service.config import Settings
from service.errors import InvalidRequest, ModelLoadError
from service.imaging import Geometry, decode, thumbnail, to_input
from service.metrics import Metrics
from service.model import ModelInfo, OnnxModel
from service.store import MemoryStore, PredictionStore, RedisStore, StoredPrediction


@dataclass
class Classified:
    """One image's outputs (batch dimension removed), with where it came from."""

    outputs: dict[str, np.ndarray]
    geometry: Geometry
    image: Image.Image
    timings_ms: dict[str, float]

    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.outputs[f"attention_{i}"], self.outputs[f"gates_{i}"]


@dataclass(frozen=True)
class OverlayParams:
    layer: str = "combined"  # an attended layer index, or "combined"
    head: int | None = None  # one head, or None for the gate-weighted mix
    colormap: str = "viridis"
    alpha: float = 0.5
    max_size: int | None = None
    mode: str = "overlay"  # or "heatmap": the coloured map alone


def make_store(settings: Settings) -> PredictionStore:
    if settings.STORE == "redis":
        return RedisStore(settings.REDIS_URL, settings.STORE_MAX_ITEMS, settings.STORE_TTL_S)
    return MemoryStore(settings.STORE_MAX_ITEMS, settings.STORE_TTL_S)


class Runtime:
    """What the routes need, built once in the app's lifespan."""

    def __init__(self, settings: Settings, metrics: Metrics, store: PredictionStore | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model = OnnxModel(settings.MODEL_PATH, settings.PROVIDERS, settings.INTRA_OP_THREADS)
        self.info: ModelInfo = self.model.info
        self.store = store or make_store(settings)
        self.batcher = MicroBatcher(
            self.model.run,
            settings.MAX_BATCH_SIZE,
            settings.MAX_WAIT_MS,
            settings.QUEUE_SIZE,
            on_batch=metrics.observe_batch,
        )
        metrics.queue_depth.set_function(lambda: self.batcher.depth)

    async def start(self) -> None:
        if isinstance(self.store, RedisStore):
            try:
                await self.store.ping()
            except Exception as e:
                raise ModelLoadError(f"cannot reach the Redis store at {self.settings.REDIS_URL}: {e}") from e
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        await self.store.close()

    def prepare(self, data: bytes) -> tuple[Image.Image, np.ndarray, Geometry]:
        s = self.settings
        img = decode(data, s.MAX_IMAGE_PIXELS, s.ALPHA_BACKGROUND)
        x, geometry = to_input(img, self.info.input_size, s.RESIZE)
        return img, x, geometry

    async def classify(self, data: bytes) -> Classified:
        started = time.perf_counter()
        img, x, geometry = await run_in_threadpool(self.prepare, data)
        decoded = time.perf_counter()
        outputs = await self.batcher.submit(x[None])
        done = time.perf_counter()
        row = {k: v[0] for k, v in outputs.items()}
        timings = {"decode_ms": (decoded - started) * 1e3, "inference_ms": (done - decoded) * 1e3}
        return Classified(row, geometry, img, timings)

    async def infer_tensor(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return await self.batcher.submit(x)

    def describe(self, c: Classified, top_k: int, with_probabilities: bool) -> dict[str, Any]:
        """The JSON body of a prediction, without id, URLs and total time."""
        names, info = self.info.class_names, self.info
        probs = c.outputs["probabilities"]
        order = np.argsort(-probs)[:top_k]
        global_gates = c.outputs["global_gates"]
        layer_probs = c.outputs["layer_probabilities"]

        def top(p: np.ndarray) -> dict[str, Any]:
            i = int(np.argmax(p))
            return {"label": names[i], "index": i, "probability": float(p[i])}

        layers = []
        for i, name in enumerate(info.layer_names):
            entry: dict[str, Any] = {
                "name": name,
                "global_gate": float(global_gates[i]),
                "top_class": top(layer_probs[i]),
            }
            if i < info.attended_layers:
                entry.update(index=i, stride=info.strides[i], gates=c.layer(i)[1].astype(float).tolist())
            layers.append(entry)
        result: dict[str, Any] = {
            "model": {"name": info.name, "version": info.version},
            "top_k": [{"label": names[i], "index": int(i), "probability": float(probs[i])} for i in order],
            "global_gates": {name: float(g) for name, g in zip(info.layer_names, global_gates)},
            "layers": layers,
            "image": {"width": c.geometry.width, "height": c.geometry.height},
        }
        if with_probabilities:
            result["probabilities"] = {names[i]: float(p) for i, p in enumerate(probs)}
        return result

    def snapshot(self, c: Classified, result: dict[str, Any], max_side: int | None = None) -> StoredPrediction:
        """What an overlay needs of a prediction; the image shrunk to `max_side` if given."""
        attended = range(self.info.attended_layers)
        photo = thumbnail(c.image, max_side) if max_side else c.image
        return StoredPrediction(
            result=result,
            masks=[c.layer(i)[0] for i in attended],
            maps=[c.outputs[f"attention_map_{i}"] for i in attended],
            combined=c.outputs["attention_combined"],
            content=c.geometry.content,
            image=np.asarray(photo),
        )

    async def remember(self, c: Classified, result: dict[str, Any]) -> str:
        key = uuid.uuid4().hex
        await self.store.put(key, self.snapshot(c, result, self.settings.STORE_IMAGE_MAX_SIZE))
        return key

    def render(self, stored: StoredPrediction, p: OverlayParams) -> bytes:
        layers = len(stored.maps)
        if p.layer == "combined":
            if p.head is not None:
                raise InvalidRequest("head applies to one attended layer, not to 'combined'")
            grid = stored.combined
        else:
            if not (p.layer.isascii() and p.layer.isdigit() and len(p.layer) <= 3 and int(p.layer) < layers):
                raise InvalidRequest(
                    f"layer must be 'combined' or an attended layer index 0..{layers - 1}, got {p.layer[:20]!r}"
                )
            i = int(p.layer)
            heads = stored.masks[i].shape[0]
            if p.head is not None and not 0 <= p.head < heads:
                raise InvalidRequest(f"head must be between 0 and {heads - 1} for this layer, got {p.head}")
            grid = stored.maps[i] if p.head is None else stored.masks[i][p.head]
        h, w = stored.image.shape[:2]
        out_w, out_h = overlay.output_size(w, h, p.max_size)
        heat = overlay.to_image_grid(grid, self.info.input_size, stored.content, out_w, out_h)
        photo = None
        if p.mode == "overlay":
            photo = Image.fromarray(stored.image)
            if photo.size != (out_w, out_h):
                photo = photo.resize((out_w, out_h), Image.BILINEAR)
        return overlay.render(heat, photo, p.colormap, p.alpha)
