"""The bench on a GPU host: onnxruntime's CUDA provider, the fine-grained model at large batches, the service.

    python -m bench.gpu [--seconds 4] [--skip G4,G5] [--variant LABEL:WARN_X=1] [--kserve-python PATH]
                        [--out bench/results-gpu]

Needs onnxruntime-gpu. Load comes from bench.load (aiohttp): GPU images rarely have wrk. Rows:
  G1 raw session.run on CUDA, default model, batch 1, 32 and 512 (the service's CUDA settings: TF32 off)
  G2 CUDA vs CPU parity, largest |difference| of a probability, TF32 off and on
  G3 WRN-16-4 (AD=3, AW=4), 224x224, 200 classes: img/s and GPU memory per batch size, vs its AD=0
     backbone; each batch size in a fresh process (onnxruntime keeps its arena at its peak)
  G4 decode + letterbox + session.run without HTTP, one process per core (bench/pipeline.py)
  G5 the service as `make serve` runs it (one worker per core), /v1/predict for the three images of
     `make bench`, with the load's own CPU and the GPU's busy share while it ran
  G6 /v1/attention (512x512 PNG overlay) vs /v1/predict at the same load
  G7 (with --variant) the photo at 64 connections under other settings, or from another checkout
  G8 the GPU memory each worker of the service holds (and the shared session's process, where on)
  G9 the naive FastAPI + PyTorch app (bench/naive_app.py, on this GPU) vs the service: the photo at 1, 16
     and 64 connections (needs the model's own packages: torch and tyro)
  G10 (with --kserve-python) KServe's ModelServer on the same ONNX file, onnxruntime on CUDA, vs the
     service: the same binary v2 request at 16 and 64 connections
  G11 session.run with the batch size the same every run or changing, per cuDNN search mode, and padded
      runs, launched kernel by kernel or replayed as a CUDA graph (WARN_CUDA_GRAPH)
With --profile, py-spy samples each variant's shared session process (idle threads included) and its busiest
worker (running threads only) under load.
The fine-grained model is exported with random weights unless --fine and --fine-backbone name files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench import load, protocols
from bench.server import ROOT, KServe, Uvicorn, bench_images, f, rate, scrape, smi, stages, variant
from bench.server import machine as host

DEFAULT_ONNX = ROOT / "default_model/model.onnx"
DEFAULT_CKPT = ROOT / "default_model/model.pt"
CUDA = "CUDAExecutionProvider"
PEER_CONNECTIONS = (16, 64)  # G10's load levels, the service's v2 figures taken at the same


def cuda_session(path: Path, tf32: bool = False) -> ort.InferenceSession:
    from service.config import Settings

    options = {**Settings().cuda_options(), "use_tf32": int(tf32)}
    return ort.InferenceSession(str(path), providers=[(CUDA, options), "CPUExecutionProvider"])


def active_provider() -> str:
    """The provider a CUDA session of the default model really runs on."""
    return cuda_session(DEFAULT_ONNX).get_providers()[0]


def cpu_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def gpu_memory_mb(pid: int) -> float | None:
    """GPU memory held by process `pid`, from nvidia-smi (None where it does not list it)."""
    for line in smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits").splitlines():
        p, _, mb = line.partition(",")
        if p.strip() == str(pid):
            return float(mb)
    return None


class GpuBusy:
    """Samples the GPU's utilization (nvidia-smi, every 100 ms) while a `with` block runs."""

    def __enter__(self) -> GpuBusy:
        self.samples: list[float] = []
        if not shutil.which("nvidia-smi"):
            self.proc = None
            return self
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line))
            except ValueError:
                pass

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        self.proc.wait(5)
        self.reader.join(5)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def raw_rows(seconds: float) -> list[dict]:
    session = cuda_session(DEFAULT_ONNX)
    size = session.get_inputs()[0].shape[2:]
    x = np.random.default_rng(0).random((512, 3, *size), dtype=np.float32)
    rows = []
    for batch in (1, 32, 512):
        rows.append(
            {
                "row": "G1",
                "batch": batch,
                "img_s": rate(lambda b=batch: session.run(None, {"image": x[:b]}), batch, seconds),
                "provider": session.get_providers()[0],
            }
        )
    return rows


def parity(path: Path, batch: int, size: tuple[int, int]) -> dict:
    x = np.random.default_rng(1).random((batch, 3, *size), dtype=np.float32)
    want = cpu_session(path).run(["probabilities"], {"image": x})[0]
    out = {}
    for tf32 in (False, True):
        got = cuda_session(path, tf32).run(["probabilities"], {"image": x})[0]
        out["tf32_on" if tf32 else "tf32_off"] = float(np.abs(got - want).max())
    return out


def shape_rows(seconds: float) -> list[dict]:
    """G11: ms per run on the service's path (IO binding, TF32 off) when every run has the same batch size, and
    when it changes from run to run as a busy worker's batches do (1..8), for each cuDNN search mode; and the
    changing batches padded to 8 (WARN_CUDA_FIXED_BATCH), launched kernel by kernel or replayed as a CUDA
    graph (WARN_CUDA_GRAPH)."""
    from service.config import Settings
    from service.errors import ModelLoadError
    from service.model import OnnxModel

    size = cpu_session(DEFAULT_ONNX).get_inputs()[0].shape[2:]
    x = np.random.default_rng(0).random((8, 3, *size), dtype=np.float32)
    rows = []
    for search in ("HEURISTIC", "DEFAULT", "EXHAUSTIVE"):
        options = {**Settings().cuda_options(), "cudnn_conv_algo_search": search}
        for label, fixed, sizes, graph in (
            ("4 every run", 0, [4], False),
            ("1..8", 0, range(1, 9), False),
            ("1..8 padded to 8", 8, range(1, 9), False),
            ("1..8 padded to 8, CUDA graph", 8, range(1, 9), True),
        ):
            try:
                model = OnnxModel(DEFAULT_ONNX, CUDA, 1, options, fixed_batch=fixed, cuda_graph=graph)
            except ModelLoadError as e:  # a CUDA graph needs every node on CUDA: the other rows still count
                rows.append(
                    {"row": "G11", "what": f"session.run, batch size {label}, cuDNN search {search}", "error": str(e)}
                )
                continue
            cycle = itertools.cycle(sizes)
            for _ in range(2 * len(sizes)):  # every size seen: what is cached per shape, cached
                model.run(x[: next(cycle)])
            runs, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds:
                model.run(x[: next(cycle)])
                runs += 1
            rows.append({"row": "G11", "search": search, "batches": label, "ms_per_run": elapsed / runs * 1e3})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def probe(path: str, batch: int, seconds: float, tf32: bool) -> None:
    """In a fresh process: img/s at `batch`, and the GPU memory this process then holds."""
    session = cuda_session(Path(path), tf32)
    size = session.get_inputs()[0].shape[2:]
    x = np.random.default_rng(0).random((batch, 3, *size), dtype=np.float32)
    img_s = rate(lambda: session.run(None, {"image": x}), batch, seconds)
    print(json.dumps({"img_s": img_s, "gpu_mb": gpu_memory_mb(os.getpid()), "provider": session.get_providers()[0]}))


def fine_rows(warn: Path, plain: Path, seconds: float) -> list[dict]:
    def fresh(path: Path, batch: int, tf32: bool = False) -> dict:
        args = [sys.executable, "-m", "bench.gpu", "--probe", str(path), str(batch), str(seconds)]
        done = subprocess.run(args + (["--tf32"] if tf32 else []), capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
        return json.loads(done.stdout.strip().splitlines()[-1])

    rows = []
    for batch in (1, 64, 256):
        w = fresh(warn, batch)
        row = {"row": "G3", "batch": batch, "warn": w}
        if batch == 256:
            row["backbone"] = fresh(plain, batch)
            row["warn_tf32"] = fresh(warn, batch, tf32=True)
        rows.append(row)
    size = tuple(cpu_session(warn).get_inputs()[0].shape[2:])
    rows.append({"row": "G2", "model": "WRN-16-4 224x224, 200 classes (random)", "batch": 4, **parity(warn, 4, size)})
    return rows


def pipeline_rows(images: dict, seconds: float) -> dict:
    from bench import pipeline

    return pipeline.measure_images(
        DEFAULT_ONNX, {label: path.read_bytes() for label, (path, _) in images.items()}, seconds, CUDA
    )


def serve(checkout: Path = ROOT, **env: str) -> Uvicorn:
    """The service as `make serve` runs it, every worker warmed up (CUDA loads its kernels on first use).
    `checkout`: the tree whose `service` package runs (another revision's, to compare in the same run)."""
    server = Uvicorn(
        "service", {"WARN_MODEL_PATH": str(DEFAULT_ONNX), "WARN_GRPC_PORT": "0", **env}, launcher=True, cwd=checkout
    )
    load.measure(server.url + "/v1/predict", (ROOT / "docs/digit.png").read_bytes(), "image/png", 64, 2)
    return server


def v2_request() -> tuple[str, bytes, dict[str, str]]:
    """The default model's name and the binary v2 request of `make bench` row 6 (one image), with its headers."""
    from PIL import Image

    from service.preprocess import to_input

    meta = cpu_session(DEFAULT_ONNX).get_modelmeta().custom_metadata_map
    x, _ = to_input(Image.open(ROOT / "docs/digit.png").convert("RGB"), tuple(json.loads(meta["input_size"])))
    body, header_length = protocols.http_body(x[None], "probabilities")
    headers = {"Inference-Header-Content-Length": str(header_length)}
    return meta["model_name"], body, headers


def service_rows(images: dict, seconds: float, ceilings: dict, ours_v2: dict | None = None) -> list[dict]:
    """G5, G6 and G8; with `ours_v2`, also the v2 request at PEER_CONNECTIONS into it, for G10."""
    rows = []
    server = serve()
    try:
        held = [gpu_memory_mb(pid) for pid in server.workers()]
        shared = [gpu_memory_mb(pid) for pid in server.sessions()]
        rows.append(
            {
                "row": "G8",
                "workers": len(held),
                "gpu_mb": [m for m in held if m is not None],
                "session_gpu_mb": [m for m in shared if m is not None],
            }
        )
        plan = [("photo (640x427 JPEG)", c) for c in (1, 16, 64)]
        plan += [("digit.png (640x400 PNG)", c) for c in (1, 64)] + [("4000x3000 JPEG", c) for c in (1, 64)]
        for label, c in plan:
            path, ctype = images[label]
            r = predict_load(server, path, ctype, c, seconds)
            ceiling = ceilings.get(label, {})
            rows.append(
                {
                    "row": "G5",
                    "image": label,
                    **r,
                    "pipeline_img_s": ceiling.get("img_s"),
                    "pipeline_p50_ms": ceiling.get("single_p50_ms"),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        path, ctype = images["digit.png (640x400 PNG)"]
        att = load.measure(server.url + "/v1/attention?max_size=512", path.read_bytes(), ctype, 16, seconds)
        pred = load.measure(server.url + "/v1/predict", path.read_bytes(), ctype, 16, seconds)
        rows.append({"row": "G6", **att, "predict_req_s": pred["req_s"], "ratio": att["req_s"] / pred["req_s"]})
        if ours_v2 is not None:
            name, body, headers = v2_request()
            url = f"{server.url}/v2/models/{name}/infer"
            for c in PEER_CONNECTIONS:
                ours_v2[c] = load.measure(url, body, "application/octet-stream", c, seconds, headers)
    finally:
        server.stop()
    return rows


def versus(peer: dict, ours: dict | None) -> dict:
    """A peer's load figures with ours at the same load beside them."""
    if not ours:
        return {**peer, "ours_req_s": None}
    return {
        **peer,
        "ours_req_s": ours["req_s"],
        "ours_p50_ms": ours["p50_ms"],
        "ours_p99_ms": ours["p99_ms"],
        "ratio": ours["req_s"] / peer["req_s"] if peer["req_s"] else None,
        "p99_ratio": ours["p99_ms"] / peer["p99_ms"] if peer["p99_ms"] else None,
    }


def naive_rows(images: dict, seconds: float, ours: dict[int, dict]) -> list[dict]:
    """G9: bench/naive_app.py (torch on this GPU, one process, as most users would start it) with the photo,
    against the service's G5 figures at the same connections."""
    path, ctype = images["photo (640x427 JPEG)"]
    naive = Uvicorn("bench.naive_app:app", {"WARN_CHECKPOINT": str(DEFAULT_CKPT)})
    try:
        load.measure(naive.url + "/predict", path.read_bytes(), ctype, 4, 1)  # CUDA's first kernels
        rows = []
        for c in (1, 16, 64):
            r = load.measure(naive.url + "/predict", path.read_bytes(), ctype, c, seconds)
            rows.append({"row": "G9", **versus(r, ours.get(c))})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        naive.stop()
    return rows


def kserve_rows(python: str, seconds: float, ours_v2: dict[int, dict]) -> list[dict]:
    """G10: KServe's ModelServer (bench/kserve_server.py run by `python`, onnxruntime on CUDA, one process)
    with the binary v2 request, against the service's figures for it at the same connections."""
    name, body, headers = v2_request()
    peer = KServe(python, DEFAULT_ONNX, name, 0, cuda=True)
    url = f"{peer.url}/v2/models/{name}"
    try:
        load.measure(url + "/infer", body, "application/octet-stream", 4, 1, headers)  # CUDA's first kernels
        rows = []
        for c in PEER_CONNECTIONS:
            r = load.measure(url + "/infer", body, "application/octet-stream", c, seconds, headers)
            rows.append({"row": "G10", **versus(r, ours_v2.get(c))})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        peer.stop()
    return rows


def predict_load(server: Uvicorn, path: Path, ctype: str, connections: int, seconds: float) -> dict:
    """bench.load on /v1/predict, with the server's CPU (in cores, each worker's too) and the GPU's busy share."""
    metrics = scrape(server.url)
    before, t0 = server.cpu_by_process(), time.perf_counter()
    with GpuBusy() as busy:
        r = load.measure(server.url + "/v1/predict", path.read_bytes(), ctype, connections, seconds)
    wall = time.perf_counter() - t0  # spawning the load included: the cores are a little understated
    after = server.cpu_by_process()
    cores = {pid: (after[pid] - before.get(pid, 0.0)) / wall for pid in after}
    seen = stages(metrics, scrape(server.url))
    return {
        **r,
        **seen,
        "runs_s": seen["runs"] / wall,
        "server_cpu": sum(cores.values()),
        "worker_cores": sorted((round(cores[pid], 2) for pid in server.workers()), reverse=True),
        "session_cores": [round(cores[pid], 2) for pid in server.sessions() if pid in cores],
        "writer_cores": [round(cores[pid], 2) for pid in server.writers() if pid in cores],
        "gpu_busy": busy.mean,
    }


def variant_rows(
    images: dict, seconds: float, label: str, env: dict[str, str], profile: str = "", native: bool = False
) -> list[dict]:
    env = dict(env)
    checkout = env.pop("checkout", None)
    server = serve(Path(checkout) if checkout else ROOT, **env)
    spies: list[threading.Thread] = []
    try:
        path, ctype = images["photo (640x427 JPEG)"]
        if profile:
            for pid in server.sessions():  # where it waits matters too: idle samples kept
                spies.append(spy_later(lambda pid=pid: pid, 0, seconds * 0.8, f"{profile}-{slug(label)}-session.txt"))
            lead = min(1.0, seconds / 4)  # the load's start, then half a second to find the busiest worker
            spies.append(
                spy_later(
                    lambda: busiest(server), lead, seconds * 0.6, f"{profile}-{slug(label)}-worker.txt", False, native
                )
            )
        r = predict_load(server, path, ctype, 64, seconds)
        for spy in spies:
            spy.join(60)
    finally:
        server.stop()
    return [{"row": "G7", "variant": label, **r}]


def busiest(server: Uvicorn, window: float = 0.5) -> int:
    """The worker that used the most CPU over `window` seconds."""
    before = server.cpu_by_process()
    time.sleep(window)
    after = server.cpu_by_process()
    return max(server.workers(), key=lambda pid: after.get(pid, 0.0) - before.get(pid, 0.0))


def spy_later(
    pick, delay: float, seconds: float, out: str, idle: bool = True, native: bool = False
) -> threading.Thread:
    """py-spy, in a thread: after `delay` seconds, on the process `pick()` names."""

    def run() -> None:
        time.sleep(delay)
        argv = py_spy(pick(), seconds, out, idle, native)
        subprocess.run(argv, stdout=subprocess.DEVNULL, timeout=seconds + 60)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def py_spy(pid: int, seconds: float, out: str, idle: bool = True, native: bool = False) -> list[str]:
    """py-spy sampling `pid` without pausing it, as collapsed stacks in `out`: idle threads included, or
    (`idle` False) only where threads run, so a worker's six mostly waiting threads do not drown it.
    `native` adds the C/C++ frames (onnxruntime, CUDA, libjpeg), which needs the process paused per sample."""
    how = ["--native", "-r", "100"] if native else ["--nonblocking", "-r", "200"]
    return ["py-spy", "record", "-p", str(pid), "-d", str(max(1, round(seconds))), *how,
            *(["--idle"] if idle else []), "-f", "raw", "-o", out]  # fmt: skip


def slug(label: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in label.lower()).split())


def inside(r: dict) -> str:
    """The service's own view of a load (its metrics): runs, their batch and time, an image's stages."""
    if not r.get("runs"):
        return ""
    text = (
        f"; {r['runs_s']:,.0f} runs/s of {f(r['mean_batch'], 2)} images, {f(r['run_ms'], 2)} ms "
        f"each; per image decode {f(r['decode_ms'], 2)} ms, model (queue + run) {f(r['model_ms'], 2)} ms"
    )
    if r.get("session_runs"):
        text += (
            f"; the shared session {r['session_runs'] / r['runs'] * r['runs_s']:,.0f} runs/s of "
            f"{f(r['session_batch'], 2)} images, {f(r['session_run_ms'], 2)} ms each"
        )
    return text


def machine() -> dict:
    return {**host(), "driver": smi("--query-gpu=driver_version", "--format=csv,noheader")}


def markdown(m: dict, rows: list[dict]) -> str:
    lines = [
        f"Measured {m['date']} on {m['gpu']}, {m['driver']}, {m['cores']} cores ({m['cpu']}); "
        f"onnxruntime {m['onnxruntime']}. "
        "Command: `python -m bench.gpu`.",
        "",
        "| # | what | figures |",
        "|---|---|---|",
    ]
    for r in rows:
        n = r["row"]
        cores = r.get("worker_cores")
        spread = f" (workers {min(cores):.2f}-{max(cores):.2f})" if cores else ""
        if r.get("session_cores"):
            spread += f", shared session {r['session_cores'][0]:.2f}"
        if r.get("writer_cores"):
            spread += f", store writer {r['writer_cores'][0]:.2f}"
        if "error" in r:
            lines.append(f"| {n} | {r.get('what', '')} | failed: {r['error']} |")
        elif n == "G1":
            lines.append(
                f"| G1 | session.run, default model, batch {r['batch']} | {f(r['img_s'])} img/s on {r['provider']} |"
            )
        elif n == "G2":
            lines.append(
                f"| G2 | CUDA vs CPU, {r['model']}, batch {r['batch']}: largest probability difference | "
                f"TF32 off {r['tf32_off']:.1e}, TF32 on {r['tf32_on']:.1e} |"
            )
        elif n == "G3":

            def one(x: dict) -> str:
                return x.get("error") or f"{f(x['img_s'])} img/s, {f(x['gpu_mb'], 0)} MB GPU ({x['provider']})"

            text = f"WARN {one(r['warn'])}"
            if "backbone" in r:
                text += f"; AD=0 backbone {one(r['backbone'])}; WARN with TF32 {one(r['warn_tf32'])}"
                if "img_s" in r["warn"] and "img_s" in r["backbone"]:
                    text += f"; WARN vs backbone {r['warn']['img_s'] / r['backbone']['img_s']:.2f}x"
            lines.append(f"| G3 | WRN-16-4 AD=3 AW=4, 224x224, 200 classes, batch {r['batch']} | {text} |")
        elif n == "G4":
            lines.append(
                f"| G4 | pipeline without HTTP, {r['image']}, {r['processes']} processes | "
                f"{f(r['img_s'])} img/s; one image alone p50 {f(r['single_p50_ms'], 2)} ms |"
            )
        elif n == "G5":
            vs = f" ({r['req_s'] / r['pipeline_img_s']:.2f}x the pipeline)" if r.get("pipeline_img_s") else ""
            failed = f"{r['non_2xx']} {r['codes']}" if r["non_2xx"] else "0"
            lines.append(
                f"| G5 | /v1/predict, {r['image']}, {r['connections']} conn | {f(r['req_s'])} req/s{vs}; p50 "
                f"{f(r['p50_ms'], 2)} ms, p99 {f(r['p99_ms'], 2)} ms; not 2xx {failed}; GPU busy "
                f"{f(r['gpu_busy'], 0)}%; server CPU {r['server_cpu']:.1f} cores{spread}, "
                f"load {r['client_cpu']:.1f} cores{inside(r)} |"
            )
        elif n == "G7":
            lines.append(
                f"| G7 | /v1/predict, photo (640x427 JPEG), 64 conn, {r['variant']} | {f(r['req_s'])} req/s; p50 "
                f"{f(r['p50_ms'], 2)} ms, p99 {f(r['p99_ms'], 2)} ms; not 2xx {r['non_2xx']}; GPU busy "
                f"{f(r['gpu_busy'], 0)}%; server CPU {r['server_cpu']:.1f} cores{spread}, "
                f"load {r['client_cpu']:.1f} cores{inside(r)} |"
            )
        elif n == "G8":
            mb, shared = r["gpu_mb"], r.get("session_gpu_mb")
            held = f"{f(min(mb), 0)}-{f(max(mb), 0)} MB each, {f(sum(mb), 0)} MB in all" if mb else "none listed"
            if shared:
                held += f"; the shared session {f(shared[0], 0)} MB"
            lines.append(f"| G8 | GPU memory of the service's {r['workers']} workers, after warm-up | {held} |")
        elif n in ("G9", "G10"):
            what = (
                "/v1/predict, photo, vs the naive FastAPI + PyTorch app"
                if n == "G9"
                else "v2 infer, binary FP32 (batch 1), vs KServe ModelServer (1 process, CUDA)"
            )
            peer = f"peer {f(r['req_s'])} req/s, p99 {f(r['p99_ms'], 2)} ms, not 2xx {r['non_2xx']}"
            if r.get("ours_req_s") is None:
                text = f"{peer}; ours not measured"
            else:
                text = (
                    f"ours {f(r['ours_req_s'])} vs {peer}: **{r['ratio']:.2f}x**; "
                    f"p99 ours {f(r['ours_p99_ms'], 2)} ms ({r['p99_ratio']:.2f}x)"
                )
            lines.append(f"| {n} | {what}, {r['connections']} conn | {text} |")
        elif n == "G11":
            lines.append(
                f"| G11 | session.run, default model, batch size {r['batches']}, cuDNN search {r['search']} | "
                f"{f(r['ms_per_run'], 2)} ms per run |"
            )
        elif n == "G6":
            lines.append(
                f"| G6 | /v1/attention?max_size=512 (PNG), digit.png, 16 conn | {f(r['req_s'])} req/s vs "
                f"/v1/predict {f(r['predict_req_s'])} ({r['ratio']:.2f}x); p99 {f(r['p99_ms'], 2)} ms |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip", default="", help="sections not to run, comma-separated (e.g. G4,G5; G5 includes G6)")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--fine", help="the fine-grained WARN model (default: exported here, random weights)")
    p.add_argument("--fine-backbone", help="its AD=0 backbone")
    p.add_argument("--out", default=str(ROOT / "bench/results-gpu"))
    p.add_argument(
        "--variant",
        action="append",
        type=variant,
        default=[],
        metavar="LABEL:K=V,K=V",
        help="also serve the photo at 64 connections with these settings (repeatable); checkout=PATH serves "
        "the service package of another tree (e.g. a `git archive` of the revision before)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy each --variant's shared session process and busiest worker under load (<out>-<variant>-*.txt)",
    )
    p.add_argument(
        "--native",
        action="store_true",
        help="with --profile: the busiest worker's C/C++ frames too (onnxruntime, CUDA, libjpeg), each sample "
        "pausing it",
    )
    p.add_argument(
        "--kserve-python",
        help="a Python with kserve and onnxruntime-gpu: adds G10, KServe's ModelServer on CUDA as a peer",
    )
    p.add_argument("--probe", nargs=3, metavar=("MODEL", "BATCH", "SECONDS"), help=argparse.SUPPRESS)
    p.add_argument("--tf32", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.profile and not shutil.which("py-spy"):
        p.error("--profile needs py-spy on PATH (pip install py-spy)")
    if a.probe:
        return probe(a.probe[0], int(a.probe[1]), float(a.probe[2]), a.tf32)
    if CUDA not in ort.get_available_providers():
        sys.exit("bench.gpu: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    if (active := active_provider()) != CUDA:  # no GPU, or CUDA libraries missing
        sys.exit(
            f"bench.gpu: onnxruntime-gpu fell back to {active}: no GPU, or CUDA 13 / cuDNN 9 not on the library path"
        )
    m = machine()
    rows: list[dict] = []

    skip = set(a.skip.split(","))

    def section(what: str, fn) -> None:
        if what in skip:
            return
        started = time.perf_counter()
        try:
            rows.extend(fn())
        except Exception as e:  # one failed section must not lose the others' figures
            traceback.print_exc()
            rows.append({"row": what, "what": what, "error": f"{type(e).__name__}: {e}"})
        print(f"{what}: {time.perf_counter() - started:.0f} s", flush=True)
        Path(a.out + ".md").write_text(markdown(m, rows))
        Path(a.out + ".json").write_text(json.dumps({"machine": m, "rows": rows}, indent=2))

    section("G1", lambda: raw_rows(a.seconds))
    size = tuple(cpu_session(DEFAULT_ONNX).get_inputs()[0].shape[2:])
    section("G2", lambda: [{"row": "G2", "model": "default", "batch": 64, **parity(DEFAULT_ONNX, 64, size)}])
    section("G11", lambda: shape_rows(min(a.seconds, 2.0)))
    with tempfile.TemporaryDirectory() as tmp:

        def fine() -> list[dict]:
            warn, plain = (Path(a.fine), Path(a.fine_backbone)) if a.fine else export_fine(Path(tmp))
            return fine_rows(warn, plain, a.seconds)

        section("G3", fine)
    work = Path(tempfile.mkdtemp(prefix="warn-bench-gpu-"))
    images = bench_images(work)
    ceilings: dict = {}

    def pipelines() -> list[dict]:
        ceilings.update(pipeline_rows(images, a.seconds))
        return [{"row": "G4", "image": label, **c} for label, c in ceilings.items()]

    section("G4", pipelines)
    ours_v2: dict[int, dict] = {}
    section("G5", lambda: service_rows(images, a.seconds, ceilings, ours_v2 if a.kserve_python else None))
    photo = {r["connections"]: r for r in rows if r["row"] == "G5" and r.get("image") == "photo (640x427 JPEG)"}
    section("G9", lambda: naive_rows(images, a.seconds, photo))
    if a.kserve_python:
        section("G10", lambda: kserve_rows(a.kserve_python, a.seconds, ours_v2))
    profile = a.out if a.profile else ""
    for label, env in a.variant:
        section("G7", lambda label=label, env=env: variant_rows(images, a.seconds, label, env, profile, a.native))
    shutil.rmtree(work, ignore_errors=True)
    print(markdown(m, rows))


def export_fine(folder: Path) -> tuple[Path, Path]:
    """WRN-16-4 (AD=3, AW=4) at 224x224 with 200 classes, random weights, and its AD=0 backbone (needs torch)."""
    try:
        import torch
    except ImportError:
        raise RuntimeError("G3 exports its models with torch: install it, or pass --fine and --fine-backbone") from None

    from export.onnx_export import _export
    from models.warn import WARN, WARNConfig, plain_backbone

    torch.manual_seed(0)
    config = WARNConfig(depth=16, width=4, attention_depth=3, attention_width=4, num_classes=200, input_size=(224, 224))
    model = WARN(config).eval()
    _export(model, folder / "warn.onnx")
    _export(plain_backbone(model), folder / "plain.onnx")
    return folder / "warn.onnx", folder / "plain.onnx"


if __name__ == "__main__":
    main()
