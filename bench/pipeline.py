"""The ceiling for the service: the same decode, letterbox and session.run, without HTTP.

One process per core, each looping over the same encoded image with the service's own functions
(`service.pipeline.prepare`, which decodes and letterboxes as `/v1/predict` does, and
`service.model.OnnxModel`) at batch 1, one onnxruntime thread each. Single-image latency is one process
with every core.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

from service.config import Settings, cores
from service.model import OnnxModel
from service.pipeline import prepare


def _loop(model_path: str, data: bytes, threads: int, seconds: float, providers: str, out) -> None:
    settings = Settings()
    model = OnnxModel(Path(model_path), providers, threads, settings.cuda_options())  # as the service runs it
    size = model.info.input_size

    def once() -> None:
        _, x, _ = prepare(data, 0, size, settings)
        model.run(x[None])

    for _ in range(3):
        once()
    lat = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        once()
        lat.append(time.perf_counter() - t)
    out.put(lat)


def measure(model_path: Path, data: bytes, seconds: float, providers: str = "CPUExecutionProvider") -> dict:
    """Images/s over one process per core, and p50 latency of one image alone (every core)."""
    ctx = mp.get_context("spawn")
    usable = cores()  # as the service counts them

    def run(processes: int, threads: int) -> list[list[float]]:
        q = ctx.Queue()
        ps = [
            ctx.Process(target=_loop, args=(str(model_path), data, threads, seconds, providers, q))
            for _ in range(processes)
        ]
        for p in ps:
            p.start()
        lats = [q.get() for _ in ps]
        for p in ps:
            p.join()
        return lats

    parallel = run(usable, 1)
    alone = run(1, usable)[0]
    return {
        "img_s": sum(len(lat) / sum(lat) for lat in parallel),
        "single_p50_ms": float(np.percentile(alone, 50)) * 1e3,
        "processes": usable,
    }
