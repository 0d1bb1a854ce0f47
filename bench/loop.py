"""Where the event loop's CPU goes in one /v1/predict, layer by layer (not a test).

    .venv/bin/python -m bench.loop                    # the bench's photo (640x427 JPEG)
    .venv/bin/python -m bench.loop --image docs/digit.png --requests 1000

All of a worker's connections share its event loop, so the loop's CPU per request bounds what a worker
serves and adds to every request's latency. This runs the app in this process, without sockets or HTTP
parsing (uvicorn's share is not counted), and times the loop thread's own CPU (`time.thread_time`) for
the same upload through ever more of the stack. Decoding and the model run in other threads and do not
count. The layers take turns request by request, in shuffled order, so the machine's drift falls on all
alike: differences of 0.05 ms show, where req/s under wrk moves 5% between runs on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from service.config import Settings

LAYERS = (
    "decode and run: the hop to a decoding thread and back",
    "+ the answer's JSON and the stored prediction",
    "+ a plain Starlette route: the body read, the JSON response",
    "+ the app's middleware (request id, metrics, body limits, HEAD, errors)",
    "+ FastAPI's route: auth, query parameters, URLs (= /v1/predict as served)",
)


async def call(app: Any, state: dict, path: str, ctype: str, body: bytes, root: Any = None) -> int:
    """One POST through `app` as uvicorn would make it, without a socket: the body in reads of 64 KB, each a
    copy, as uvicorn hands them on (its read buffer's high-water mark, then `bytes()` of the buffer)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost"), (b"content-type", ctype.encode()), (b"content-length", b"%d" % len(body))],
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "state": dict(state),
        "app": root or app,  # set by the app itself; a call to its router alone needs it given
    }
    reads = iter([body[i : i + 65536] for i in range(0, len(body), 65536)] or [b""])  # an empty body: one empty read
    pending = len(body)
    status = []

    async def receive() -> dict:
        nonlocal pending
        chunk = next(reads, None)
        if chunk is None:
            await asyncio.Event().wait()  # the client stays connected
        pending -= len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": pending > 0}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return status[0]


async def measure(image: bytes, ctype: str, requests: int, settings: Settings | None = None) -> dict[str, list[float]]:
    """Loop CPU seconds of each layer's requests (the first 20 of each dropped as warm-up), for the service
    with `settings` (default: the environment's WARN_ settings, without the gRPC port)."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from service.main import create_app
    from service.response import describe
    from service.store import new_key

    app = create_app(settings or Settings(GRPC_PORT=0))
    async with app.router.lifespan_context(app) as state:
        rt = app.state.runtime

        side = 0 if rt.kept_upload(image) is not None else rt.settings.STORE_IMAGE_MAX_SIZE  # as /v1/predict

        async def answer(data: bytes) -> dict:
            upload = rt.kept_upload(data)
            c = await rt.classify(data, side)
            key = new_key()
            g = c.geometry
            result = {"id": key, **describe(rt.info, c.outputs, (g.width, g.height), rt.settings.TOP_K, False)}
            await rt.remember(key, c, result, upload)
            return result

        async def plain(request: Request) -> JSONResponse:
            return JSONResponse(await answer(await request.body()))

        app.router.routes.insert(0, Route("/plain", plain, methods=["POST"]))
        steps: dict[str, Callable[[], Awaitable[Any]]] = dict(
            zip(
                LAYERS,
                (
                    lambda: rt.classify(image, side),
                    lambda: answer(image),
                    lambda: call(app.router, state, "/plain", ctype, image, root=app),
                    lambda: call(app, state, "/plain", ctype, image),
                    lambda: call(app, state, "/v1/predict", ctype, image),
                ),
            )
        )
        for layer in reversed(LAYERS[2:]):  # through the app first: its error handlers answer a bad upload
            if (status := await steps[layer]()) != 200:
                raise SystemExit(f"{layer}: HTTP {status}")
        cpu: dict[str, list[float]] = {layer: [] for layer in LAYERS}
        order = list(LAYERS)
        for _ in range(requests + 20):
            random.shuffle(order)
            for layer in order:
                started = time.thread_time()
                await steps[layer]()
                cpu[layer].append(time.thread_time() - started)
    return {layer: times[20:] for layer, times in cpu.items()}


def table(cpu: dict[str, list[float]]) -> str:
    lines = ["| layer | loop CPU per request, median | added |", "|---|---|---|"]
    before = 0.0
    for layer, times in cpu.items():
        ms = statistics.median(times) * 1e3
        added = f"+{ms - before:.3f} ms" if before else ""
        lines.append(f"| {layer} | {ms:.3f} ms | {added} |")
        before = ms
    return "\n".join(lines)


def main() -> None:
    from importlib.resources import files

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", type=Path, help="an image file (default: the bench's 640x427 JPEG photo)")
    p.add_argument("--requests", type=int, default=600, help="per layer (default: %(default)s)")
    a = p.parse_args()
    if a.requests < 1:
        p.error("--requests must be at least 1")
    if a.image and not a.image.is_file():
        p.error(f"no such file: {a.image}")
    if a.image:
        image = a.image.read_bytes()
        ctype = {b"\x89PN": "image/png", b"\xff\xd8\xff": "image/jpeg"}.get(image[:3], "application/octet-stream")
    else:
        image, ctype = (files("sklearn.datasets") / "images" / "china.jpg").read_bytes(), "image/jpeg"
    try:
        import uvloop  # the loop uvicorn runs the service on
    except ImportError:
        cpu = asyncio.run(measure(image, ctype, a.requests))
    else:
        cpu = uvloop.run(measure(image, ctype, a.requests))
    print(table(cpu))


if __name__ == "__main__":
    main()
