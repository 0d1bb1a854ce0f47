"""warn-predict: classify images with a running WARN service and save their attention overlays.

    warn-predict docs/digit.png                       # prints the top classes and the gates
    warn-predict photos/*.jpg --url http://gpu-host:8000 --format webp

It uses only the public API (POST /v1/predict, then the overlay URLs in its answer), so it doubles as
an example of it. Overlays are saved next to each image as <name>.warn-<map>.<format>.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm


def count(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more, got {text!r}")
    return int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="warn-predict", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, WebP, ...)")
    p.add_argument(
        "--url",
        default=os.environ.get("WARN_URL", "http://127.0.0.1:8000"),
        help="the service's base URL (default: $WARN_URL or %(default)s)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("WARN_API_KEY"),
        help="sent as a bearer token (default: $WARN_API_KEY, if set)",
    )
    p.add_argument("--top-k", type=int, default=3, help="classes to show per image (default: %(default)s)")
    p.add_argument(
        "--overlays",
        choices=["all", "combined", "none"],
        default="all",
        help="which overlays to save: the combined map and each layer's, the combined one, or none "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--format", choices=["png", "webp", "jpeg"], default="png", help="overlay format (default: %(default)s)"
    )
    p.add_argument("--max-size", type=int, help="longest side of the overlays (default: the image's, up to 1024)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=60, help="seconds per request (default: %(default)s)")
    p.add_argument(
        "--retries",
        type=count,
        default=5,
        help="times a request the service turns away for now (503: a full queue, a session or store restarting) is "
        "sent again, after the Retry-After it gives (default: %(default)s)",
    )
    return p


class ServiceError(Exception):
    """The service answered with an error; its JSON body says what was wrong."""


MAX_RETRY_WAIT_S = 30.0


def retry_wait(response: httpx.Response, attempt: int) -> float:
    """Seconds to wait before sending again: the service's Retry-After (it sends whole seconds), else doubling
    from half a second; never more than MAX_RETRY_WAIT_S. Up to a quarter more at random, so that clients turned
    away together do not all come back together."""
    given = response.headers.get("retry-after", "")
    wait = float(given) if given.isascii() and given.isdigit() else 0.5 * 2 ** min(attempt, 16)
    return min(wait, MAX_RETRY_WAIT_S) * (1 + random.random() / 4)


async def send(
    client: httpx.AsyncClient, retries: int, method: str, url: str | httpx.URL, **kwargs: Any
) -> httpx.Response:
    """The request, sent again up to `retries` times while the service answers 503 ("retry shortly")."""
    attempt = 0
    while (response := await client.request(method, url, **kwargs)).status_code == 503 and attempt < retries:
        await asyncio.sleep(retry_wait(response, attempt))
        attempt += 1
    return check(response)


def check(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        message = response.json().get("error", response.text)
    except ValueError:
        message = response.text[:200]
    raise ServiceError(f"{message} (HTTP {response.status_code})")


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def report(path: Path, answer: dict[str, Any], saved: list[Path]) -> str:
    top = answer["top_k"][0]
    classes = table(
        [[str(i + 1), c["label"], f"{c['probability']:.4f}"] for i, c in enumerate(answer["top_k"])],
        ["rank", "class", "probability"],
    )
    gates = table(
        [
            [
                layer["name"],
                f"{layer['global_gate']:.3f}",
                f"{layer['top_class']['label']} ({layer['top_class']['probability']:.2f})",
                " ".join(f"{g:.3f}" for g in layer.get("gates") or []) or "-",
            ]
            for layer in answer["layers"]
        ],
        ["layer", "global gate", "its class", "head gates"],
    )
    trusted = max(answer["layers"], key=lambda layer: layer["global_gate"])["name"]
    lines = [
        f"{path}: {top['label']} ({top['probability']:.4f}), most trusted: {trusted}",
        classes,
        "",
        gates,
    ]
    if saved:
        lines += ["", "overlays: " + ", ".join(str(p) for p in saved)]
    if warnings := answer.get("warnings"):
        lines += ["", *(f"warning: {w}" for w in warnings)]
    return "\n".join(lines) + "\n"


async def predict_one(
    client: httpx.AsyncClient, args: argparse.Namespace, path: Path
) -> tuple[dict[str, Any], list[Path]]:
    data = path.read_bytes()  # bytes, not the file: a retry sends them again
    answer = (
        await send(
            client, args.retries, "POST", "/v1/predict", params={"top_k": args.top_k}, files={"file": (path.name, data)}
        )
    ).json()
    urls = answer.get("attention_urls") or {}  # none where the service could not keep the prediction
    wanted = {"all": list(urls), "combined": ["combined"], "none": []}[args.overlays] if urls else []
    params = {"format": args.format, **({"max_size": args.max_size} if args.max_size else {})}
    saved = []
    for name in wanted:
        # merged into the URL's own query (a signature, where the service signs them): params= would replace it
        url = httpx.URL(urls[name]).copy_merge_params(params)
        image = (await send(client, args.retries, "GET", url)).content
        target = path.with_name(f"{path.stem}.warn-{name}.{args.format}")
        target.write_bytes(image)
        saved.append(target)
    return answer, saved


async def run(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency)
    failed = 0
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as client:
        gate = asyncio.Semaphore(args.concurrency)

        async def one(path: Path) -> tuple[Path, Any]:
            async with gate:
                try:
                    return path, await predict_one(client, args, path)
                except (ServiceError, OSError, httpx.TransportError) as e:
                    return path, e

        jobs = [asyncio.ensure_future(one(p)) for p in args.images]
        progress = tqdm(total=len(jobs), unit="image", disable=len(jobs) < 2, file=sys.stderr)
        results = {}
        for done in asyncio.as_completed(jobs):
            path, outcome = await done
            results[path] = outcome
            progress.update()
        progress.close()
    for path in args.images:  # in the order given, whatever order they finished in
        outcome = results[path]
        if isinstance(outcome, httpx.TransportError):
            print(f"warn-predict: cannot reach {args.url}: {outcome}", file=sys.stderr)
            return 2
        if isinstance(outcome, Exception):
            failed += 1
            print(f"{path}: {outcome}\n", file=sys.stderr)
        else:
            print(report(path, *outcome))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(asyncio.run(run(parser().parse_args(argv))))


if __name__ == "__main__":
    main()
