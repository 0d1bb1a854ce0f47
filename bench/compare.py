"""Before/after: the service at another revision against this checkout, in one run (not a test).

    .venv/bin/python -m bench.compare 70ccc02      # prints a markdown table

Each revision's service runs as that revision ran it (`python -m service` where it has one, else
one uvicorn process) on this checkout's default model, under the same `wrk` load as `make bench`.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from bench.run import DEFAULT_ONNX, ROOT, Uvicorn, bench_images, wrk


def serve(checkout: Path) -> Uvicorn:
    """The service at `checkout`, as that revision ran it, on this checkout's default model."""
    launcher = (checkout / "service/__main__.py").exists()
    env = {"PYTHONPATH": str(checkout), "WARN_MODEL_PATH": str(DEFAULT_ONNX)}
    return Uvicorn("service.main:app", env, launcher=launcher, cwd=checkout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="the revision to compare against, e.g. 70ccc02")
    p.add_argument("--seconds", type=float, default=5.0)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="warn-compare-"))
    images = bench_images(work)
    base = work / "base"
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(base), a.base], cwd=ROOT, check=True)
    rows: dict[tuple[str, int], dict[str, dict]] = {}
    try:
        for label, checkout in (("before", base), ("after", ROOT)):
            server = serve(checkout)
            try:
                for name, (path, ctype) in images.items():
                    for c in (1, 8, 32):
                        rows.setdefault((name, c), {})[label] = wrk(
                            f"{server.url}/v1/predict", c, a.seconds, path, ctype
                        )
                path, ctype = images["digit.png (640x400 PNG)"]
                att = wrk(f"{server.url}/v1/attention?max_size=512", 8, a.seconds, path, ctype)
                rows.setdefault(("/v1/attention, digit.png", 8), {})[label] = att
            finally:
                server.stop()
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    print(f"| request | connections | before ({a.base}) req/s, p99 | after req/s, p99 | ratio |")
    print("|---|---|---|---|---|")
    for (name, c), r in rows.items():
        b, n = r["before"], r["after"]
        print(
            f"| {name} | {c} | {b['req_s']:.1f}, {b['p99_ms']:.0f} ms | {n['req_s']:.1f}, {n['p99_ms']:.0f} ms | "
            f"{n['req_s'] / b['req_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
