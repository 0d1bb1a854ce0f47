"""The ceiling for the service: the same decode, letterbox and session.run, without HTTP.

One process per core, each looping over the same encoded image with the service's own functions
(`service.pipeline.prepare`, which decodes and letterboxes as `/v1/predict` does, and
`service.model.OnnxModel`) at batch 1, one onnxruntime thread each. Single-image latency is one process
with every core.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from pathlib import Path

import numpy as np

from service.config import Settings, cores
from service.model import OnnxModel
from service.pipeline import prepare

# A process that died leaves the others waiting at the barrier for no longer than this.
BARRIER_TIMEOUT_S = 600.0


def _loop(model_path: str, images: dict[str, bytes], threads: int, seconds: float, providers: str, start, out) -> None:
    settings = Settings()
    model = OnnxModel(Path(model_path), providers, threads, settings.cuda_options())  # as the service runs it
    size = model.info.input_size
    for label, data in images.items():

        def once(data: bytes = data) -> None:
            _, x, _ = prepare(data, 0, size, settings)
            model.run(x[None])

        for _ in range(3):
            once()
        start.wait(BARRIER_TIMEOUT_S)  # every process times this image over the same seconds
        lat = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            once()
            lat.append(time.perf_counter() - t)
        out.put((label, lat))


def answer(q, processes: list) -> tuple[str, list[float]]:
    """The next (image, latencies) a process sent; raises instead where one of them died."""
    while True:
        try:
            return q.get(timeout=1)
        except queue.Empty:
            if dead := [p.exitcode for p in processes if p.exitcode not in (None, 0)]:
                raise RuntimeError(f"a pipeline process exited with code {dead[0]}") from None


def measure_images(
    model_path: Path, images: dict[str, bytes], seconds: float, providers: str = "CPUExecutionProvider"
) -> dict[str, dict]:
    """`measure` for each image, by the same processes one image after another: each process makes its
    session once (on a GPU host 16 processes take seconds to, for every image they were started for)."""
    ctx = mp.get_context("spawn")
    usable = cores()  # as the service counts them

    def run(processes: int, threads: int) -> dict[str, list[list[float]]]:
        q, start = ctx.Queue(), ctx.Barrier(processes)
        ps = [
            ctx.Process(target=_loop, args=(str(model_path), images, threads, seconds, providers, start, q))
            for _ in range(processes)
        ]
        for p in ps:
            p.start()
        lats: dict[str, list[list[float]]] = {label: [] for label in images}
        try:
            for _ in range(processes * len(images)):
                label, lat = answer(q, ps)
                lats[label].append(lat)
        except BaseException:
            for p in ps:
                p.kill()
            raise
        finally:
            for p in ps:
                p.join()
        return lats

    parallel = run(usable, 1)
    alone = run(1, usable)
    return {
        label: {
            "img_s": sum(len(lat) / sum(lat) for lat in parallel[label]),
            "single_p50_ms": float(np.percentile(alone[label][0], 50)) * 1e3,
            "processes": usable,
        }
        for label in images
    }


def measure(model_path: Path, data: bytes, seconds: float, providers: str = "CPUExecutionProvider") -> dict:
    """Images/s over one process per core, and p50 latency of one image alone (every core)."""
    return measure_images(model_path, {"image": data}, seconds, providers)["image"]
