"""HTTP load where wrk is missing (GPU images rarely have it): keep-alive POSTs from several processes.

    python -m bench.load URL BODY_FILE [--content-type T] [--connections 1,16,64] [--seconds 5]

Prints one JSON line per load level: requests/s, p50 and p99 latency, counts by status, and the CPU the
load itself used, which it takes from the server's host. One aiohttp process drives up to
PER_PROCESS connections; more connections are spread over more processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import resource
import time

import numpy as np

PER_PROCESS = 16


def _client(url: str, body: bytes, headers: dict, connections: int, seconds: float, start, out) -> None:
    import aiohttp

    async def main() -> tuple[list[float], dict[str, int], float]:
        latencies: list[float] = []
        codes: dict[str, int] = {}
        timeout = aiohttp.ClientTimeout(total=60)
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def post() -> str:
                try:
                    async with session.post(url, data=body, headers=headers) as r:
                        await r.read()
                        return str(r.status)
                except (TimeoutError, aiohttp.ClientError) as e:  # a dropped connection is a result too
                    return type(e).__name__

            start.wait()  # connections open in the timed run: opened here, idle ones could hit keep-alive timeouts
            began = time.perf_counter()
            deadline = began + seconds

            async def worker() -> None:
                while time.perf_counter() < deadline:
                    t = time.perf_counter()
                    code = await post()
                    latencies.append(time.perf_counter() - t)
                    codes[code] = codes.get(code, 0) + 1

            await asyncio.gather(*(worker() for _ in range(connections)))
            elapsed = time.perf_counter() - began
        return latencies, codes, elapsed

    before = resource.getrusage(resource.RUSAGE_SELF)
    latencies, codes, elapsed = asyncio.run(main())
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out.put((latencies, codes, cpu, elapsed))


def measure(
    url: str, body: bytes, ctype: str, connections: int, seconds: float, headers: dict[str, str] | None = None
) -> dict:
    """Closed-loop load at `connections`: the same keys as bench.run.wrk's answer, plus `codes`.
    `headers` go with every request besides the Content-Type."""
    if connections < 1:
        raise ValueError(f"connections must be at least 1, got {connections}")
    ctx = mp.get_context("spawn")
    processes = math.ceil(connections / PER_PROCESS)
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    start = ctx.Barrier(processes + 1)
    out = ctx.Queue()
    headers = {**(headers or {}), "Content-Type": ctype}
    procs = [
        ctx.Process(target=_client, args=(url, body, headers, n, seconds, start, out), daemon=True) for n in shares
    ]
    for p in procs:
        p.start()
    start.wait(timeout=120)
    results = [out.get(timeout=seconds + 120) for _ in procs]
    wall = max(elapsed for *_, elapsed in results)
    for p in procs:
        p.join()
    latencies = np.array([x for lat, *_ in results for x in lat]) * 1e3
    codes: dict[str, int] = {}
    for _, c, *_ in results:
        for k, v in c.items():
            codes[k] = codes.get(k, 0) + v
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    return {
        "connections": connections,
        "req_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else math.nan,
        "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else math.nan,
        "non_2xx": len(latencies) - ok,
        "codes": codes,
        "client_cpu": sum(cpu for _, _, cpu, _ in results) / wall,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("body", help="file sent as each request's body")
    p.add_argument("--content-type", default="application/octet-stream")
    p.add_argument("--connections", default="1,16,64", help="comma-separated load levels")
    p.add_argument("--seconds", type=float, default=5.0)
    a = p.parse_args(argv)
    levels = [int(x) for x in a.connections.split(",")]
    if min(levels) < 1:
        p.error("--connections: each level must be at least 1")
    body = open(a.body, "rb").read()
    for c in levels:
        print(json.dumps(measure(a.url, body, a.content_type, c, a.seconds)), flush=True)


if __name__ == "__main__":
    main()
