"""A GPU host's worker, measured without a GPU: one service worker against a shared session whose
`session.run` is a sleep (not a test).

On a GPU host each worker sends its batches to the shared session's process and waits for them while its
own core decodes the next requests. Here that process runs `bench.session_standin`'s stand-in (a sleep of
the GPU's run time, which releases the GIL as a CUDA run does, and the default model's output shapes), so
the worker's CPU is what the machine spends, as on the GPU host. Each variant is a worker of its own on
the same stand-in, and they take turns under wrk's load:

    .venv/bin/python -m bench.gpu_standin --variant "2 ms:WARN_MAX_WAIT_MS=2" --variant "none:WARN_MAX_WAIT_MS=0"

What it cannot show: sixteen workers contending for one session process and the host's cores.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from multiprocessing.connection import Listener
from pathlib import Path

from bench.run import DEFAULT_ONNX, wrk
from bench.server import Uvicorn, bench_images, cpu_by_thread, f, scrape, stages, variant
from bench.session_standin import standin
from service.shared_session import ADDRESS_ENV, KEY_ENV, Runner, serve_connections


def session(address: str, key: bytes, gpu_s: float, rows: int, runs: int) -> None:
    """The shared session's loop, on the stand-in, telling workers the default model's description."""
    from service.config import Settings
    from service.model import OnnxModel

    info = OnnxModel.from_settings(Settings(MODEL_PATH=DEFAULT_ONNX)).info
    serve_connections(Listener(address, "AF_UNIX", authkey=key), info, Runner(standin(gpu_s, rows), rows), runs)


def start_session(folder: str, gpu_s: float, rows: int, runs: int) -> tuple[mp.process.BaseProcess, dict[str, str]]:
    address, key = str(Path(folder) / "socket"), os.urandom(32)
    proc = mp.get_context("spawn").Process(target=session, args=(address, key, gpu_s, rows, runs), daemon=True)
    proc.start()
    deadline = time.monotonic() + 120
    while not Path(address).exists():
        if not proc.is_alive() or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the stand-in session did not start")
        time.sleep(0.05)
    return proc, {ADDRESS_ENV: address, KEY_ENV: key.hex()}


ROLES = ("loop", "decode", "inference", "store-writer")


def measure(server: Uvicorn, path: Path, ctype: str, connections: int, seconds: float) -> dict:
    metrics, threads = scrape(server.url), cpu_by_thread(server.proc.pid)
    r = wrk(f"{server.url}/v1/predict", connections, seconds, path, ctype, server=server)
    seen, after = stages(metrics, scrape(server.url)), cpu_by_thread(server.proc.pid)
    per_request = {role: (after.get(role, 0.0) - threads.get(role, 0.0)) / seen["images"] * 1e3 for role in ROLES}
    return {
        **r,
        **seen,
        "cpu_ms": r["server_cpu"] / r["req_s"] * 1e3,
        **{f"cpu_{k}_ms": v for k, v in per_request.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", type=variant, default=[], help="LABEL:WARN_X=V,... (repeatable)")
    p.add_argument("--connections", default="2,4,8", help="comma-separated; a 16-core host at 64 has 4 a worker")
    p.add_argument("--images", default="photo", help="comma-separated: photo, digit, big")
    p.add_argument("--gpu-ms", type=float, default=2.0, help="the stand-in's run time (an H100's padded run: 1.6-2)")
    p.add_argument("--rows", type=int, default=16, help="rows of every run (WARN_MAX_BATCH_SIZE, padded)")
    p.add_argument("--runs", type=int, default=2, help="WARN_SHARED_SESSION_RUNS of the stand-in")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--rounds", type=int, default=2, help="turns of each variant under each load")
    a = p.parse_args()
    variants = dict(a.variant or [("as configured", {})])
    work = Path(tempfile.mkdtemp(prefix="warn-standin-"))
    named = dict(zip(("digit", "photo", "big"), bench_images(work).values()))
    images = {name: named[name] for name in a.images.split(",")}
    proc, env = start_session(str(work), a.gpu_ms / 1e3, a.rows, a.runs)
    servers: dict[str, Uvicorn] = {}
    turns: dict[tuple[str, int, str], list[dict]] = {}
    try:
        for label, settings in variants.items():
            servers[label] = Uvicorn(
                "service.main:app", {**env, "WARN_MODEL_PATH": str(DEFAULT_ONNX), "WARN_GRPC_PORT": "0", **settings}
            )
        for name, (path, ctype) in images.items():
            for c in map(int, a.connections.split(",")):
                for server in servers.values():
                    measure(server, path, ctype, c, 1)  # warm-up
                for _ in range(a.rounds):
                    for label, server in servers.items():
                        turns.setdefault((name, c, label), []).append(measure(server, path, ctype, c, a.seconds))
    finally:
        for server in servers.values():
            server.stop()
        proc.kill()
        shutil.rmtree(work, ignore_errors=True)  # the bench images and the session's socket
    print(f"Stand-in: {a.gpu_ms} ms a run of {a.rows} rows, {a.runs} in flight; medians of {a.rounds} turns.\n")
    print(
        "| image | connections | variant | req/s | p50 | worker CPU per request (event loop, decoding, inference, "
        "store) | decode | model (queue + run) | worker's batch round trip | rows a batch |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    keys = (
        "req_s",
        "p50_ms",
        "cpu_ms",
        "decode_ms",
        "model_ms",
        "run_ms",
        "mean_batch",
        *(f"cpu_{r}_ms" for r in ROLES),
    )
    for (name, c, label), rs in turns.items():
        m = {k: statistics.median(r[k] for r in rs) for k in keys}
        roles = ", ".join(f(m[f"cpu_{r}_ms"], 2) for r in ROLES)
        print(
            f"| {name} | {c} | {label} | {f(m['req_s'])} | {f(m['p50_ms'])} ms | {f(m['cpu_ms'], 2)} ms ({roles}) "
            f"| {f(m['decode_ms'], 2)} ms | {f(m['model_ms'], 2)} ms | {f(m['run_ms'], 2)} ms "
            f"| {f(m['mean_batch'], 2)} |"
        )


if __name__ == "__main__":
    main()
