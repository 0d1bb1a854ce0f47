"""Before/after: the service at another revision against this checkout, in one run (not a test).

    .venv/bin/python -m bench.compare 70ccc02      # prints a markdown table
    .venv/bin/python -m bench.compare HEAD --after-env WARN_SHARED_SESSION=true   # a setting, same code
    .venv/bin/python -m bench.compare 70ccc02 --v2  # also the v2 binary request tritonclient sends
    .venv/bin/python -m bench.compare 70ccc02 --gc  # also the workers' garbage collection per request

Each revision's service runs as that revision ran it (`python -m service` where it has one, else
one uvicorn process) on this checkout's default model, under the same `wrk` load as `make bench`.
Both run at once (idle workers do not spin) and take turns under load, `--rounds` turns each, so
drift in this machine's speed falls on both alike; each figure is the median of its turns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.run import DEFAULT_ONNX, write_v2_request, wrk
from bench.server import ROOT, Uvicorn, bench_images

GC_HOOK = ROOT / "bench/gc_hook"


def serve(checkout: Path, gc_dir: Path | None = None, **settings: str) -> Uvicorn:
    """The service at `checkout`, as that revision ran it, on this checkout's default model. With `gc_dir`,
    its processes write their garbage collection times there (bench/gc_hook)."""
    launcher = (checkout / "service/__main__.py").exists()
    env = {"PYTHONPATH": str(checkout), "WARN_MODEL_PATH": str(DEFAULT_ONNX), "WARN_GRPC_PORT": "0", **settings}
    if gc_dir is not None:
        gc_dir.mkdir(parents=True, exist_ok=True)
        env |= {"PYTHONPATH": f"{checkout}{os.pathsep}{GC_HOOK}", "BENCH_GC_DIR": str(gc_dir)}
    return Uvicorn("service.main:app", env, launcher=launcher, cwd=checkout)


def gc_totals(gc_dir: Path, pids: list[int]) -> dict[int, dict]:
    """What bench/gc_hook last wrote for each of these processes."""
    found = {}
    for pid in pids:
        try:
            found[pid] = json.loads((gc_dir / f"{pid}.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    return found


def gc_turn(before: dict[int, dict], after: dict[int, dict], requests: float) -> dict[str, float]:
    """Collection time per request over a turn (all generations, every worker) and its longest collection."""
    seconds, longest = 0.0, 0.0
    for pid, a in after.items():
        b = before.get(pid, {"seconds": [0.0] * 3, "pauses": []})
        seconds += sum(a["seconds"]) - sum(b["seconds"])
        longest = max([longest, *(took for _, took in a["pauses"][len(b["pauses"]) :])])
    return {"gc_ms": seconds / max(requests, 1) * 1e3, "gc_longest_ms": longest * 1e3}


def paced(url: str, seconds: float, body: Path, ctype: str, gap: float = 0.03) -> dict:
    """One request at a time with `gap` seconds between them, as a dashboard sends them: the latency of
    a service that is not saturated (wrk's one connection sends the next request the moment one ends)."""
    import httpx

    data = body.read_bytes()
    latencies = []
    with httpx.Client(timeout=30) as http:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            http.post(url, content=data, headers={"content-type": ctype}).raise_for_status()
            latencies.append(time.perf_counter() - started)
            time.sleep(gap)
    p50, p99 = (float(np.percentile(latencies, q)) * 1e3 for q in (50, 99))
    return {"req_s": len(latencies) / seconds, "p50_ms": p50, "p99_ms": p99}


V2 = "v2 binary FP32 (digit.png)"


def v2_body(image: Path, out: Path) -> tuple[int, str]:
    """The v2 request `make bench` sends (row 6) for `image`, written to `out`: its header's length, and the
    default model's name to send it to."""
    import onnxruntime as ort

    meta = ort.InferenceSession(str(DEFAULT_ONNX), providers=["CPUExecutionProvider"]).get_modelmeta()
    size = tuple(json.loads(meta.custom_metadata_map["input_size"]))
    _, length = write_v2_request(image, size, out)
    return length, meta.custom_metadata_map["model_name"]


def setting(text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not eq or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="the revision to compare against, e.g. 70ccc02")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3, help="turns of each server under each load")
    p.add_argument(
        "--connections", default="paced,1,8,32", help="comma-separated load levels; paced: one request every 30 ms"
    )
    p.add_argument(
        "--v2",
        action="store_true",
        help="also the Open Inference Protocol's binary FP32 request (tritonclient's form), at each wrk level",
    )
    p.add_argument(
        "--after-env",
        action="append",
        default=[],
        type=setting,
        metavar="WARN_X=V",
        help="a setting for this checkout's service only (repeatable): compares settings at one revision",
    )
    p.add_argument(
        "--gc",
        action="store_true",
        help="also the workers' garbage collection: its time per request and its longest pause, in each wrk turn",
    )
    a = p.parse_args()
    levels = a.connections.split(",")
    if any(c != "paced" for c in levels) and not shutil.which("wrk"):
        p.error("wrk is not installed (`make bench` installs it; or: apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="warn-compare-"))
    images = bench_images(work)
    base = work / "base"
    try:
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(base), a.base], cwd=ROOT, check=True)
    except subprocess.CalledProcessError:
        shutil.rmtree(work, ignore_errors=True)
        p.error(f"cannot check out {a.base!r} beside this checkout (git worktree add failed)")
    loads = [(name, path, ctype, c) for name, (path, ctype) in images.items() for c in levels]
    loads.append(("/v1/attention, digit.png", *images["digit.png (640x400 PNG)"], "8"))
    header_length, model = None, ""
    if a.v2:
        header_length, model = v2_body(images["digit.png (640x400 PNG)"][0], work / "v2.bin")
        loads += [(V2, work / "v2.bin", "application/octet-stream", c) for c in levels if c != "paced"]
    turns: dict[tuple[str, str], dict[str, list[dict]]] = {}
    servers: dict[str, Uvicorn] = {}
    try:
        gc_dirs = {label: work / f"gc-{label}" if a.gc else None for label in SIDES}
        servers["before"] = serve(base, gc_dirs["before"])
        servers["after"] = serve(ROOT, gc_dirs["after"], **dict(a.after_env))
        for name, path, ctype, c in loads:
            route = "/v1/attention?max_size=512" if name.startswith("/v1/attention") else "/v1/predict"
            if name == V2:
                route = f"/v2/models/{model}/infer"
            for _ in range(a.rounds):
                for label, server in servers.items():
                    url = f"{server.url}{route}"
                    if c == "paced":
                        r = paced(url, a.seconds, path, ctype)
                    else:
                        length = header_length if name == V2 else None
                        if gc_dir := gc_dirs[label]:
                            collected = gc_totals(gc_dir, server.workers())
                        r = wrk(url, int(c), a.seconds, path, ctype, length, server)
                        r["cpu_ms"] = r["server_cpu"] / r["req_s"] * 1e3  # the server's CPU per request
                        if gc_dir:
                            time.sleep(0.6)  # the hook's next write
                            requests = r["req_s"] * max(1, round(a.seconds))
                            r |= gc_turn(collected, gc_totals(gc_dir, server.workers()), requests)
                    turns.setdefault((name, c), {}).setdefault(label, []).append(r)
    finally:
        for server in servers.values():
            server.stop()
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
        shutil.rmtree(work, ignore_errors=True)  # the bench images
    print(table(turns, a.base))


SIDES = ("before", "after")


def table(turns: dict[tuple[str, str], dict[str, list[dict]]], base: str) -> str:
    """Medians of each side's turns. CPU per request (under wrk's load) moves less with this machine's
    speed than req/s does, since it does not count the time a process waits for a core."""
    keys = ("req_s", "p50_ms", "p99_ms", "cpu_ms", "gc_ms", "gc_longest_ms")
    lines = [
        f"| request | connections | before ({base}) req/s, p50, p99, CPU per request | after | ratio |",
        "|---|---|---|---|---|",
    ]
    for (name, c), by in turns.items():
        b, n = ({k: statistics.median(r.get(k, math.nan) for r in by[side]) for k in keys} for side in SIDES)
        for side, r in zip(SIDES, (b, n)):
            # the longest pause of any turn, not a median's
            r["gc_longest_ms"] = max((t.get("gc_longest_ms", math.nan) for t in by[side]), default=math.nan)
            r["non_2xx"] = sum(t.get("non_2xx", 0) for t in by[side])  # failures count as req/s in wrk's rate
        lines.append(f"| {name} | {c} | {figures(b)} | {figures(n)} | {n['req_s'] / b['req_s']:.2f}x |")
    return "\n".join(lines)


def figures(r: dict[str, float]) -> str:
    cpu = "" if math.isnan(r["cpu_ms"]) else f", {r['cpu_ms']:.2f} ms CPU"
    if not math.isnan(r.get("gc_ms", math.nan)):
        cpu += f" (GC {r['gc_ms']:.3f} ms, longest {r['gc_longest_ms']:.0f} ms)"
    failed = f", **{r['non_2xx']} not 2xx**" if r.get("non_2xx") else ""
    return f"{r['req_s']:.1f}, {r['p50_ms']:.1f} ms, {r['p99_ms']:.0f} ms{cpu}{failed}"


if __name__ == "__main__":
    main()
