"""The shared session's process with a stand-in for the GPU: how many runs to keep in flight (not a test).

`session.run` is replaced by a sleep of the GPU's run time (1.6 ms: the H100's padded 16-row run of the
default model), which releases the GIL as a CUDA run does, and returns the default model's outputs. Client
processes stand for the workers: each sends a batch, waits for its answer, and sends the next. What is
left is the process's own work (reading, stacking, padding, splitting and answering batches) and how it
overlaps with the run, which is what WARN_SHARED_SESSION_RUNS changes.

    .venv/bin/python -m bench.session_standin --runs 1,2,3 --clients 8,16
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path

import numpy as np

from bench.server import cpu_seconds
from service.shared_session import Runner, serve_connections

# The default model's outputs per image (bench.ops lists them; the service reads them all).
OUTPUTS = {
    "probabilities": (11,),
    "log_probabilities": (11,),
    "attention_0": (4, 48, 48),
    "attention_1": (4, 24, 24),
    "attention_2": (4, 12, 12),
    "gates_0": (4,),
    "gates_1": (4,),
    "gates_2": (4,),
    "layer_probabilities": (4, 11),
    "global_gates": (4,),
    "attention_map_0": (48, 48),
    "attention_map_1": (24, 24),
    "attention_map_2": (12, 12),
    "attention_combined": (12, 12),
}


def standin(gpu_s: float, rows: int):
    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        n = len(batch)
        padded = np.concatenate([batch, np.zeros((rows - n, *batch.shape[1:]), batch.dtype)]) if n < rows else batch
        time.sleep(gpu_s)
        return {k: np.ones((len(padded), *shape), np.float32)[:n] for k, shape in OUTPUTS.items()}

    return run


def session(address: str, key: bytes, runs: int, gpu_s: float, rows: int) -> None:
    listener = Listener(address, "AF_UNIX", authkey=key)
    serve_connections(listener, "stand-in", Runner(standin(gpu_s, rows), rows), runs)


def client(address: str, key: bytes, rows: int, seconds: float, out) -> None:
    conn = Client(address, "AF_UNIX", authkey=key)
    conn.recv()
    x = np.random.default_rng(0).random((rows, 3, 48, 48), dtype=np.float32)
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        conn.send(x)
        conn.recv()
        latencies.append(time.perf_counter() - started)
    out.put(latencies)


def measure(runs: int, clients: int, rows: int, seconds: float, gpu_s: float, max_rows: int) -> dict:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        address, key = str(Path(folder) / "socket"), os.urandom(16)
        server = ctx.Process(target=session, args=(address, key, runs, gpu_s, max_rows), daemon=True)
        server.start()
        while not Path(address).exists():
            time.sleep(0.02)
        results = ctx.Queue()
        workers = [ctx.Process(target=client, args=(address, key, rows, seconds, results)) for _ in range(clients)]
        cpu = cpu_seconds(f"/proc/{server.pid}/stat")
        for w in workers:
            w.start()
        latencies = [results.get() for _ in workers]
        cpu = cpu_seconds(f"/proc/{server.pid}/stat") - cpu
        for w in workers:
            w.join()
        server.kill()
        server.join()
    return {
        "rows_s": sum(len(lat) for lat in latencies) * rows / seconds,
        "p50_ms": float(np.median(np.concatenate(latencies))) * 1e3,
        "session_cores": cpu / seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="1,2", help="comma-separated values of WARN_SHARED_SESSION_RUNS to compare")
    p.add_argument("--clients", default="8,16", help="comma-separated numbers of workers sending batches")
    p.add_argument("--rows", type=int, default=2, help="rows per worker batch")
    p.add_argument("--max-rows", type=int, default=16, help="rows of every run (WARN_MAX_BATCH_SIZE, padded)")
    p.add_argument("--gpu-ms", type=float, default=1.6, help="the stand-in's run time")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--turns", type=int, default=2, help="each setting this many times, interleaved")
    a = p.parse_args()
    print("| workers | runs in flight | rows/s | round trip p50 | session process CPU |\n|---|---|---|---|---|")
    for clients in map(int, a.clients.split(",")):
        for _ in range(a.turns):
            for runs in map(int, a.runs.split(",")):
                r = measure(runs, clients, a.rows, a.seconds, a.gpu_ms / 1e3, a.max_rows)
                print(
                    f"| {clients} x {a.rows} rows | {runs} | {r['rows_s']:,.0f} | {r['p50_ms']:.2f} ms "
                    f"| {r['session_cores']:.2f} cores |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
