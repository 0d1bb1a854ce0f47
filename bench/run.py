"""Benchmarks: every figure next to the one it is compared with, measured in the same run.

    make bench            # writes bench/results.md and bench/results.json, prints the table

Rows, on the default model and on WARN-16-4 (AD=3, AW=4, 32x32, random weights):
  1. onnxruntime CPU vs PyTorch eager (same weights and threads), batch 1 and 32
  2. attention overhead: WARN vs the same backbone with AD=0, in onnxruntime
     and the per-pixel formulation it replaced (before/after), with FLOPs
  3. machine limit: FLOPs per image x images/s as a share of onnxruntime's float32 MatMul peak
  8. peak memory: WRN-16-4, 1000 classes, 112x112, batch 8, each model in a fresh process
Service rows (default model, `python -m service` as `make serve` runs it, on loopback, load from wrk):
  4. /v1/predict at 1, 8 and 32 connections for digit.png, a 640x427 JPEG photo and a 4000x3000 JPEG,
     vs the same decode + letterbox + session.run without HTTP, one process per core (bench/pipeline.py)
  5. overlay rendering (PNG, WebP, JPEG) vs one inference, and /v1/attention throughput
  6. the Open Inference Protocol endpoint with a binary-tensor body (as tritonclient sends) vs KServe
  7. the naive baseline: FastAPI + PyTorch eager per request, no batching
  9. JPEG decode time at full size vs the reduced scale /v1/predict uses
 10. raw session.run at batch 1 and 32, for reference
 11. the Open Inference Protocol over gRPC vs over HTTP (same binary FP32 request, h2load for both,
     8 and 32 connections), and vs KServe's ModelServer over gRPC
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench import protocols
from bench.memory import measure as memory_row
from bench.memory import per_pixel
from bench.server import ROOT, KServe, Uvicorn, bench_images, f, jpegs_of, rate
from bench.server import machine as host
from export.onnx_export import _export, output_names
from models.checkpoint import load
from models.profile import count
from models.warn import WARN, WARNConfig, plain_backbone

DEFAULT_CKPT = ROOT / "default_model/model.pt"
DEFAULT_ONNX = ROOT / "default_model/model.onnx"


def ort_session(path: Path, threads: int, providers: list[str] | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])


def matmul_peak(threads: int, seconds: float) -> float:
    """The best float32 FLOP/s of square MatMuls in onnxruntime, the runtime the model runs on (numpy
    here runs under OPENBLAS_CORETYPE, which slows it). Sizes vary: cache fit decides the best one."""
    return max(matmul_rate(threads, seconds / 4, n) for n in (256, 384, 512, 1024))


def matmul_rate(threads: int, seconds: float, n: int) -> float:
    from onnx import TensorProto, helper, numpy_helper

    b = numpy_helper.from_array(np.random.rand(n, n).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
        [b],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = np.random.rand(n, n).astype(np.float32)
    return rate(lambda: session.run(None, {"a": a}), 2 * n**3, seconds)


def interleaved(sessions: dict[str, ort.InferenceSession], x: np.ndarray, seconds: float, rounds: int = 3) -> dict:
    """Images/s of each session on `x`, the median of `rounds` turns taken in turn, so that a noisy
    neighbour slows them all alike."""
    rates: dict[str, list[float]] = {key: [] for key in sessions}
    for _ in range(rounds):
        for key, sess in sessions.items():
            rates[key].append(rate(lambda sess=sess: sess.run(None, {"image": x}), len(x), seconds / rounds))
    return {key: float(np.median(r)) for key, r in rates.items()}


def model_rows(name: str, model: WARN, path: Path, threads: int, seconds: float, peak: float) -> list[dict]:
    model.eval()
    h, w = model.config.input_size
    session = ort_session(path, threads)
    rows = []
    for bs in (1, 32):
        x = np.random.rand(bs, 3, h, w).astype(np.float32)
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            torch_rate = rate(lambda xt=xt: model(xt), bs, seconds)
        ort_rate = rate(lambda x=x: session.run(None, {"image": x}), bs, seconds)
        rows.append(
            {
                "row": 1,
                "model": name,
                "batch": bs,
                "torch_img_s": torch_rate,
                "ort_img_s": ort_rate,
                "ratio": ort_rate / torch_rate,
            }
        )

    plain = plain_backbone(model)
    with tempfile.TemporaryDirectory() as tmp:
        _export(plain, Path(tmp) / "plain.onnx")
        with per_pixel():
            _export(model, Path(tmp) / "per_pixel.onnx")
            cpp = count(model, (h, w))
        plain_session = ort_session(Path(tmp) / "plain.onnx", threads)
        pp_session = ort_session(Path(tmp) / "per_pixel.onnx", threads)
        x = np.random.rand(32, 3, h, w).astype(np.float32)
        rates = interleaved({"warn": session, "plain": plain_session, "per_pixel": pp_session}, x, seconds)
        warn_rate, plain_rate, pp_rate = (rates[k] for k in ("warn", "plain", "per_pixel"))
    cw, cp = count(model, (h, w)), count(plain, (h, w))
    rows.append(
        {
            "row": 2,
            "model": name,
            "batch": 32,
            "warn_img_s": warn_rate,
            "backbone_img_s": plain_rate,
            "per_pixel_img_s": pp_rate,
            "ratio": warn_rate / plain_rate,
            "per_pixel_ratio": pp_rate / plain_rate,
            "warn_params": cw["params"],
            "backbone_params": cp["params"],
            "warn_flops": cw["flops"],
            "backbone_flops": cp["flops"],
            "per_pixel_flops": cpp["flops"],
        }
    )
    rows.append(
        {
            "row": 3,
            "model": name,
            "batch": 32,
            "flops_per_image": cw["flops"],
            "img_s": warn_rate,
            "achieved_flop_s": cw["flops"] * warn_rate,
            "peak_flop_s": peak,
            "ratio": cw["flops"] * warn_rate / peak,
        }
    )
    return rows


def parse_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk(
    url: str,
    connections: int,
    seconds: float,
    body: Path,
    ctype: str,
    header_length: int | None = None,
    server: Uvicorn | None = None,
) -> dict:
    """Load from wrk (one thread): requests/s, p50/p99 latency, and the CPU wrk and the server used."""
    env = {**os.environ, "BODY_FILE": str(body), "CONTENT_TYPE": ctype, "HEADER_LENGTH": str(header_length or "")}
    server_cpu = server.cpu_seconds() if server else 0.0
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(ROOT / "bench/post.lua"),
            url,
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not found:
        raise RuntimeError(f"wrk against {url} printed no throughput:\n{out}")
    rps = float(found.group(1))
    pct = dict(re.findall(r"^\s+(\d+)%\s+(\S+)\s*$", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "connections": connections,
        "req_s": rps,
        "p50_ms": parse_ms(pct["50"]),
        "p99_ms": parse_ms(pct["99"]),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "wrk_cpu": (usage.ru_utime + usage.ru_stime) / wall,
        "server_cpu": (server.cpu_seconds() - server_cpu) / wall if server else None,
    }


KSERVE_VENV = ROOT / "build/kserve-venv"
KSERVE_REQUIREMENTS = ["kserve==0.21.0", "onnxruntime==1.31.1"]


def kserve_python() -> str:
    """KServe in a venv of its own (it pins its own FastAPI and uvicorn)."""
    python = KSERVE_VENV / "bin/python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(KSERVE_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *KSERVE_REQUIREMENTS], check=True)
    return str(python)


def kserve_rows(
    name: str, threads: int, seconds: float, body: Path, header_length: int, ours: dict, ours_grpc: dict, x: np.ndarray
) -> list[dict]:
    """Row 6 (KServe over HTTP) and row 11's peer (KServe over gRPC), one KServe process for both."""
    peer_server = KServe(kserve_python(), DEFAULT_ONNX, name, threads)
    try:
        url = f"{peer_server.url}/v2/models/{name}/infer"
        peer = wrk(url, 8, seconds, body, "application/octet-stream", header_length)
        address = peer_server.grpc_address
        answer = protocols.check_grpc(address, name, x, "probabilities")
        grpc_body = protocols.grpc_body(name, x, "probabilities")
        peer_grpc = {c: protocols.grpc_v2(address, grpc_body, answer, c, seconds) for c in ours_grpc}
    finally:
        peer_server.stop()
    rows = [
        {
            "row": 11,
            "peer": "KServe ModelServer over gRPC",
            **ours_grpc[c],
            "peer_req_s": r["req_s"],
            "peer_p99_ms": r["p99_ms"],
        }
        for c, r in peer_grpc.items()
    ]
    return rows + [
        {
            "row": 6,
            "endpoint": "v2 infer vs KServe ModelServer",
            "connections": 8,
            "req_s": peer["req_s"],
            "p50_ms": peer["p50_ms"],
            "p99_ms": peer["p99_ms"],
            "wrk_cpu": peer["wrk_cpu"],
            "ours_req_s": ours["req_s"],
            "ours_p99_ms": ours["p99_ms"],
            "ratio": ours["req_s"] / peer["req_s"],
            "p99_ratio": ours["p99_ms"] / peer["p99_ms"],
        }
    ]


def decode_rows(images: dict[str, tuple[Path, str]], size: tuple[int, int], seconds: float) -> list[dict]:
    """Decoding for /v1/predict: full size, at the overlay's reduced JPEG scale (what /v1/predict decoded
    while it kept pixels for overlays), and at the model's (what it decodes since it keeps a JPEG upload)."""
    from PIL import Image

    from service.config import Settings
    from service.decode import Need, decode
    from service.pipeline import need_for

    settings = Settings()
    photo = Image.open(images["4000x3000 JPEG"][0]).convert("RGB")
    rows = []
    for side, data in jpegs_of(photo).items():

        def ms(wanted: Need | None, d: bytes = data) -> float:
            return 1e3 / rate(lambda: decode(d, 40_000_000, need=wanted), 1, seconds / 3)

        full, model = ms(None), ms(need_for(0, size, settings))
        overlay = ms(need_for(settings.STORE_IMAGE_MAX_SIZE, size, settings))
        rows.append({"row": 9, "width": side, "before_ms": full, "overlay_ms": overlay, "after_ms": model})
        rows[-1]["ratio"] = full / model
    return rows


def render_rows(
    img_path: Path, session: ort.InferenceSession, size: tuple[int, int], seconds: float, rounds: int = 5
) -> list[dict]:
    """A 512x512 overlay in each format vs one batch-1 inference, rendered as a worker renders (its malloc
    settings and one BLAS thread) and timed in turns with the inference, medians of `rounds` turns: a
    run of one kind after the other once read 1.9 ms for an encode that takes 0.9 ms, on pages that
    this machine had not yet handed to the process."""
    from PIL import Image

    from service import overlay
    from service.memory import return_freed_memory
    from service.preprocess import to_input

    return_freed_memory()
    overlay.one_blas_thread()
    img = Image.open(img_path).convert("RGB")
    x, _ = to_input(img, size)
    grid = dict(zip(output_names(3), session.run(None, {"image": x[None]})))["attention_combined"][0]
    photo = img.resize((512, 512))

    def render(fmt: str) -> bytes:
        heat = overlay.to_image_grid(grid, size, (0, 0, size[1], size[0]), 512, 512)
        return overlay.render(heat, photo, "viridis", 0.5, fmt)

    formats = ("png", "webp", "jpeg")
    turn = seconds / rounds
    worker_session = ort_session(DEFAULT_ONNX, 1)  # a worker's share of a 2-core host (one render, one thread)
    times: dict[str, list[float]] = {k: [] for k in ("inference", "worker", *formats)}
    for _ in range(rounds):
        times["inference"].append(1 / rate(lambda: session.run(None, {"image": x[None]}), 1, turn))
        times["worker"].append(1 / rate(lambda: worker_session.run(None, {"image": x[None]}), 1, turn))
        for fmt in formats:
            times[fmt].append(1 / rate(lambda fmt=fmt: render(fmt), 1, turn))
    infer_s = float(np.median(times["inference"]))
    rows = []
    for fmt in formats:
        render_s = float(np.median(times[fmt]))
        rows.append(
            {
                "row": 5,
                "endpoint": f"render 512x512 overlay {fmt.upper()}",
                "render_ms": render_s * 1e3,
                "bytes": len(render(fmt)),
                "inference_ms": infer_s * 1e3,
                "one_thread_inference_ms": float(np.median(times["worker"])) * 1e3,
                "ratio": render_s / infer_s,
            }
        )
    return rows


def write_v2_request(image: Path, size: tuple[int, int], out: Path) -> tuple[np.ndarray, int]:
    """The v2 request of rows 6 and 7 (tritonclient's binary form, asking for the probabilities) for `image`,
    written to `out`: the model input it carries (3, H, W), and its header's length."""
    from PIL import Image

    from service.preprocess import to_input

    x, _ = to_input(Image.open(image).convert("RGB"), size)
    body, header_length = protocols.http_body(x[None], "probabilities")
    out.write_bytes(body)
    return x, header_length


def service_rows(threads: int, seconds: float, quick: bool) -> list[dict]:
    from bench import pipeline

    work = Path(tempfile.mkdtemp(prefix="warn-bench-"))
    images = bench_images(work)
    info_session = ort_session(DEFAULT_ONNX, threads)
    meta = info_session.get_modelmeta().custom_metadata_map
    name = meta["model_name"]
    size = tuple(json.loads(meta["input_size"]))
    max_batch = 32
    x32 = np.random.rand(max_batch, 3, *size).astype(np.float32)
    raw = {bs: rate(lambda b=bs: info_session.run(None, {"image": x32[:b]}), bs, seconds) for bs in (1, max_batch)}
    rows: list[dict] = [{"row": 10, "batch": bs, "img_s": v} for bs, v in raw.items()]
    rows += decode_rows(images, size, seconds)
    rows += render_rows(images["digit.png (640x400 PNG)"][0], info_session, size, seconds)

    x, header_length = write_v2_request(images["digit.png (640x400 PNG)"][0], size, work / "v2.bin")

    levels = (1, 32) if quick else (1, 8, 32)
    # as `make serve` runs it: one worker per core, every other setting at its default
    grpc_port = Uvicorn.free_port()
    server = Uvicorn("service", {"WARN_MODEL_PATH": str(DEFAULT_ONNX), "WARN_GRPC_PORT": str(grpc_port)}, launcher=True)
    try:
        for label, (path, ctype) in images.items():
            # next to the service's own figures (its idle workers do not spin), so that drift in this
            # machine's speed over the run falls on both sides of the ratio alike
            ceiling = pipeline.measure(DEFAULT_ONNX, path.read_bytes(), seconds)
            for c in levels:
                r = wrk(server.url + "/v1/predict", c, seconds, path, ctype, server=server)
                rows.append(
                    {
                        "row": 4,
                        "image": label,
                        **r,
                        "pipeline_img_s": ceiling["img_s"],
                        "pipeline_p50_ms": ceiling["single_p50_ms"],
                        "ratio": r["req_s"] / ceiling["img_s"],
                    }
                )
        path, ctype = images["digit.png (640x400 PNG)"]
        att = wrk(server.url + "/v1/attention?max_size=512", 8, seconds, path, ctype, server=server)
        pred8 = wrk(server.url + "/v1/predict", 8, seconds, path, ctype, server=server)
        rows.append(
            {
                "row": 5,
                "endpoint": "/v1/attention",
                **att,
                "predict_req_s": pred8["req_s"],
                "ratio": att["req_s"] / pred8["req_s"],
            }
        )
        v2 = {
            c: wrk(
                f"{server.url}/v2/models/{name}/infer",
                c,
                seconds,
                work / "v2.bin",
                "application/octet-stream",
                header_length,
                server,
            )
            for c in (1, 8)
        }
        # row 11: v2 over gRPC vs over HTTP, one load tool (h2load) for both
        body = (work / "v2.bin").read_bytes()
        address = f"127.0.0.1:{grpc_port}"
        answer = protocols.check_grpc(address, name, x[None], "probabilities")
        grpc_body = protocols.grpc_body(name, x[None], "probabilities")
        ours_grpc = {}
        for c in (8, 32):
            over_http = protocols.http_v2(server.url, name, body, header_length, c, seconds)
            ours_grpc[c] = protocols.grpc_v2(address, grpc_body, answer, c, seconds)
            rows.append(
                {
                    "row": 11,
                    "peer": "ours over HTTP",
                    **ours_grpc[c],
                    "peer_req_s": over_http["req_s"],
                    "peer_p99_ms": over_http["p99_ms"],
                }
            )
        photo, photo_ctype = images["photo (640x427 JPEG)"]
        ours_photo = {
            c: wrk(server.url + "/v1/predict", c, seconds, photo, photo_ctype, server=server) for c in (1, 8, 32)
        }
    finally:
        server.stop()

    rows += kserve_rows(name, threads, seconds, work / "v2.bin", header_length, v2[8], ours_grpc, x[None])

    naive = Uvicorn("bench.naive_app:app", {"WARN_CHECKPOINT": str(DEFAULT_CKPT), "TORCH_THREADS": str(threads)})
    try:
        for c in (1, 8, 32):
            r = wrk(naive.url + "/predict", c, seconds, photo, photo_ctype, server=naive)
            ours = ours_photo[c]
            rows.append(
                {
                    "row": 7,
                    **r,
                    "ours_req_s": ours["req_s"],
                    "ours_p99_ms": ours["p99_ms"],
                    "ratio": ours["req_s"] / r["req_s"],
                    "p99_ratio": ours["p99_ms"] / r["p99_ms"],
                }
            )
    finally:
        naive.stop()
    shutil.rmtree(work, ignore_errors=True)
    return rows


def machine() -> dict:
    return {**host(), "torch": torch.__version__}


def markdown(m: dict, rows: list[dict], command: str) -> str:
    lines = [
        f"Measured {m['date']} on {m['cores']} cores ({m['cpu']}), GPU: {m['gpu'] or 'none'}; "
        f"onnxruntime {m['onnxruntime']}, torch {m['torch']}. Command: `{command}`.",
        "",
        "| # | what | compared | figures | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        n = r["row"]
        if n == 1:
            lines.append(
                f"| 1 | {r['model']}, batch {r['batch']} | onnxruntime vs PyTorch eager | "
                f"{f(r['ort_img_s'])} vs {f(r['torch_img_s'])} img/s | {r['ratio']:.2f}x |"
            )
        elif n == 2:
            lines.append(
                f"| 2 | {r['model']}, batch 32 | WARN vs backbone (AD=0), onnxruntime | "
                f"{f(r['warn_img_s'])} vs {f(r['backbone_img_s'])} img/s; params {r['warn_params']:,} vs "
                f"{r['backbone_params']:,}; MFLOPs {r['warn_flops'] / 1e6:,.1f} vs "
                f"{r['backbone_flops'] / 1e6:,.1f} (+{r['warn_flops'] / r['backbone_flops'] - 1:.1%}) | "
                f"{r['ratio']:.2f}x |"
            )
            lines.append(
                f"| 2 | {r['model']}, batch 32 | before: per-pixel heads vs backbone | "
                f"{f(r['per_pixel_img_s'])} vs {f(r['backbone_img_s'])} img/s; MFLOPs "
                f"{r['per_pixel_flops'] / 1e6:,.1f} (+{r['per_pixel_flops'] / r['backbone_flops'] - 1:.1%}) | "
                f"{r['per_pixel_ratio']:.2f}x |"
            )
        elif n == 3:
            lines.append(
                f"| 3 | {r['model']}, batch 32 | achieved vs matmul peak | "
                f"{r['achieved_flop_s'] / 1e9:,.1f} vs {r['peak_flop_s'] / 1e9:,.1f} GFLOP/s | "
                f"{r['ratio']:.1%} |"
            )
        elif n == 4:
            latency = (
                f"; p50 {f(r['p50_ms'])} vs pipeline alone {f(r['pipeline_p50_ms'])} ms "
                f"(+{r['p50_ms'] - r['pipeline_p50_ms']:.1f} ms)"
                if r["connections"] == 1
                else f"; p50 {f(r['p50_ms'])} ms"
            )
            lines.append(
                f"| 4 | /v1/predict, {r['image']}, {r['connections']} conn | service vs the same pipeline without "
                f"HTTP | {f(r['req_s'])} vs {f(r['pipeline_img_s'])} img/s{latency}, p99 {f(r['p99_ms'])} ms; "
                f"non-2xx {r['non_2xx']}; server CPU {r['server_cpu']:.0%} | {r['ratio']:.2f}x |"
            )
        elif n == 10:
            lines.append(f"| 10 | raw session.run, batch {r['batch']} | (reference) | {f(r['img_s'])} img/s | |")
        elif n == 9:
            lines.append(
                f"| 9 | decode a {r['width']}x{r['width'] * 3 // 4} JPEG for /v1/predict | full size vs the "
                f"overlay's JPEG scale vs the model's (now) | {f(r['before_ms'], 2)} vs {f(r['overlay_ms'], 2)} vs "
                f"{f(r['after_ms'], 2)} ms | {r['ratio']:.2f}x faster |"
            )
        elif n == 5 and "render_ms" in r:
            lines.append(
                f"| 5 | {r['endpoint']} ({r['bytes'] // 1024} KB) | vs one inference (batch 1) | "
                f"{f(r['render_ms'], 2)} vs {f(r['inference_ms'], 2)} ms (one onnxruntime thread, as a worker here "
                f"runs it: {f(r['one_thread_inference_ms'], 2)} ms) | {r['ratio']:.2f}x |"
            )
        elif n == 5:
            lines.append(
                f"| 5 | /v1/attention, 8 conn | vs /v1/predict, 8 conn | {f(r['req_s'])} vs "
                f"{f(r['predict_req_s'])} req/s; p99 {f(r['p99_ms'])} ms | {r['ratio']:.2f}x |"
            )
        elif n == 6:
            lines.append(
                f"| 6 | /v2/models/{{name}}/infer, binary FP32 body, 8 conn | ours vs KServe ModelServer (1 process) | "
                f"{f(r['ours_req_s'])} vs {f(r['req_s'])} req/s; p99 {f(r['ours_p99_ms'])} vs "
                f"{f(r['p99_ms'])} ms | {r['ratio']:.2f}x (p99 {r['p99_ratio']:.2f}x) |"
            )
        elif n == 11:
            lines.append(
                f"| 11 | v2 over gRPC, binary FP32, {r['connections']} conn (h2load) | ours over gRPC vs "
                f"{r['peer']} | {f(r['req_s'])} vs {f(r['peer_req_s'])} req/s; p99 {f(r['p99_ms'])} vs "
                f"{f(r['peer_p99_ms'])} ms | {r['req_s'] / r['peer_req_s']:.2f}x "
                f"(p99 {r['p99_ms'] / r['peer_p99_ms']:.2f}x) |"
            )
        elif n == 8:
            lines.append(
                f"| 8 | {r['model']}, batch {r['batch']} | peak RSS, WARN vs backbone (fresh processes) | "
                f"{f(r['warn_peak_mb'], 0)} vs {f(r['plain_peak_mb'], 0)} MB; before (per-pixel): "
                f"{f(r['per_pixel_peak_mb'], 0)} MB ({r['per_pixel_ratio']:.1f}x); without the NCHWc layout "
                f"(ORT_ENABLE_EXTENDED): {f(r['warn_unblocked_peak_mb'], 0)} vs "
                f"{f(r['plain_unblocked_peak_mb'], 0)} MB ({r['unblocked_ratio']:.2f}x) | {r['ratio']:.2f}x |"
            )
        elif n == 7:
            lines.append(
                f"| 7 | /v1/predict, photo (640x427 JPEG), {r['connections']} conn | ours vs naive FastAPI + PyTorch | "
                f"{f(r['ours_req_s'])} vs {f(r['req_s'])} req/s; p99 {f(r['ours_p99_ms'])} vs "
                f"{f(r['p99_ms'])} ms | {r['ratio']:.2f}x (p99 {r['p99_ratio']:.2f}x) |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--quick", action="store_true", help="fewer load levels, for a smoke run")
    p.add_argument("--models-only", action="store_true", help="rows 1-3 and 8 only: no servers")
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    a = p.parse_args(argv)
    missing = [tool for tool in ("wrk", "h2load") if not shutil.which(tool)]
    if not a.models_only and missing:
        sys.exit(f"bench: {', '.join(missing)} missing (Debian: wrk, nghttp2-client; `make bench` installs them)")
    torch.set_num_threads(a.threads)
    m = machine()
    peak = matmul_peak(a.threads, a.seconds)
    default, _ = load(DEFAULT_CKPT)
    rows = model_rows("default " + default.config.name, default, DEFAULT_ONNX, a.threads, a.seconds, peak)
    torch.manual_seed(0)
    big = WARN(WARNConfig(depth=16, width=4, attention_depth=3, attention_width=4, input_size=(32, 32))).eval()
    with tempfile.TemporaryDirectory() as tmp:
        _export(big, Path(tmp) / "big.onnx")
        rows += model_rows("warn-16-4-ad3-aw4 (random)", big, Path(tmp) / "big.onnx", a.threads, a.seconds, peak)
    rows.append({"row": 8, **memory_row(batch=8, threads=a.threads)})
    if not a.models_only:
        rows += service_rows(a.threads, a.seconds, a.quick)
    flags = " ".join(f for f, on in (("--quick", a.quick), ("--models-only", a.models_only)) if on)
    command = "make bench" + (f" BENCH_ARGS='{flags}'" if flags else "")
    table = markdown(m, rows, command)
    Path(a.out + ".md").write_text(table)
    Path(a.out + ".json").write_text(json.dumps({"machine": m, "rows": rows}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
