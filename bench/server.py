"""What every bench shares, without torch (a GPU host's bench may lack it): the service in a process of
its own, the three images it is measured on, the machine's description, and rate and number helpers."""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def smi(*args: str) -> str:
    """nvidia-smi's output ('' where it is missing)."""
    if not shutil.which("nvidia-smi"):
        return ""
    return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True).stdout.strip()


def machine() -> dict:
    """Where a bench ran: date, cores, CPU, GPU (None without one), onnxruntime and its providers."""
    import onnxruntime as ort

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "date": dt.date.today().isoformat(),
        "cores": os.cpu_count(),
        "cpu": cpu,
        "gpu": smi("--query-gpu=name", "--format=csv,noheader") or None,
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
    }


def f(v: float | None, digits: int = 1) -> str:
    """A figure for a table: thousands separated, `digits` decimals; n/a for None."""
    return "n/a" if v is None else f"{v:,.{digits}f}"


def variant(text: str) -> tuple[str, dict[str, str]]:
    """A `--variant` of the benches that serve the service under other settings: 'LABEL:WARN_X=V,WARN_Y=W'
    (no settings: 'LABEL:'). A value may hold '=' (checkout=PATH, a JSON list); a pair without one is refused."""
    label, colon, rest = text.partition(":")
    pairs = [kv.partition("=") for kv in rest.split(",") if kv]
    if not colon or not label or any(not k or not eq for k, eq, _ in pairs):
        raise argparse.ArgumentTypeError(f"expected LABEL:WARN_X=V[,WARN_Y=W], got {text!r}")
    return label, {k: v for k, _, v in pairs}


def cpu_seconds(stat: str) -> float | None:
    """User+system seconds from a /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat file (None: it is gone)."""
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_thread(pid: int) -> dict[str, float]:
    """User+system seconds so far of a process's threads, by role: `loop` (its main thread, the event loop
    in a worker), the service's named pools (`decode`, `inference`, `store-writer`, `session-run`: see
    service/threads.py) and `other` (onnxruntime's and the rest)."""
    seconds: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except FileNotFoundError:  # the thread ended
            continue
        if (cpu := cpu_seconds(f"/proc/{pid}/task/{tid}/stat")) is None:
            continue
        named = re.fullmatch(r"(.+)_\d+", comm)
        role = "loop" if int(tid) == pid else named.group(1) if named else "other"
        seconds[role] = seconds.get(role, 0.0) + cpu
    return seconds


def rate(fn: Callable[[], object], items: int, seconds: float) -> float:
    """Items per second of `fn` (which handles `items` per call), after a warm-up, over at least `seconds`."""
    for _ in range(3):
        fn()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        fn()
        calls += 1
    return calls * items / elapsed


def wait_until_answered(
    proc: subprocess.Popen,
    url: str,
    what: str,
    last_output: Callable[[], str] | None = None,
    ready: Callable[[int], bool] = lambda status: status == 200,
    timeout: float = 120,
) -> None:
    """Until `url` answers with a `ready` status. Fails at once if `proc` exits first (on a lent GPU
    host, waiting out the timeout costs device time), with its last line of output where it is kept."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            why = f": {last_output()}" if last_output else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before it answered{why}")
        try:
            if ready(httpx.get(url, timeout=1).status_code):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not answer in {timeout:.0f} s")


def last_line(log) -> str:
    """The last line a process wrote to `log`, a file it writes its output to."""
    log.seek(0)
    return (log.read().decode(errors="replace").strip().splitlines() or ["no output"])[-1]


class Uvicorn:
    """A server process on a free loopback port; `cpu_seconds` is its user+system time so far."""

    @staticmethod
    def free_port() -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __init__(self, app: str, env: dict[str, str], launcher: bool = False, cwd: Path = ROOT) -> None:
        """`launcher`: `python -m service`, as `make serve` runs it (workers and all); else uvicorn on `app`.
        `cwd`: the checkout to run (another revision's, for bench.compare). Its output, uvicorn's access log
        included, goes to a file, as a container's goes to its log."""
        self.port = self.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *(["service"] if launcher else ["uvicorn", app]), "--port", str(self.port)],
            cwd=cwd,
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_answered(
                self.proc, self.url + "/docs", app, lambda: last_line(self.log), ready=lambda status: True
            )
        except TimeoutError:
            self.stop()
            raise

    def cpu_seconds(self) -> float:
        """User+system seconds of the server and its worker processes."""
        return sum(self.cpu_by_process().values())

    def cpu_by_process(self) -> dict[int, float]:
        """User+system seconds so far of the server and of each of its child processes, by pid."""
        seconds = {}
        for pid in [self.proc.pid, *self.children()]:
            if (cpu := cpu_seconds(f"/proc/{pid}/stat")) is not None:
                seconds[pid] = cpu
        return seconds

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def workers(self) -> list[int]:
        """Pids of the server's worker processes (multiprocessing's resource tracker, the shared session's
        process and the store writer's left out)."""
        helpers = [*self.sessions(), *self.writers()]
        return [
            p
            for p in self.children()
            if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes() and p not in helpers
        ]

    def sessions(self) -> list[int]:
        """The pid of the shared session's process, where the workers share one."""
        return [p for p in self.children() if Path(f"/proc/{p}/comm").read_text().strip() == "warn-session"]

    def writers(self) -> list[int]:
        """The pid of the store writer's process, where the workers share a disk store."""
        return [p for p in self.children() if Path(f"/proc/{p}/comm").read_text().strip() == "warn-store"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


def scrape(url: str) -> dict[str, float]:
    """The service's /metrics, each sample by its name and labels (empty where it cannot be read)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def stages(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """What the service's own metrics say of the load between two scrapes: session.runs, their mean
    batch and time, and each image's mean decode and model (queue + run) time, in ms; where the workers
    share a session, its own runs too."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    def mean(name: str, labels: str = "", scale: float = 1e3) -> float | None:
        count = delta(f"{name}_count{{{labels}}}")
        return delta(f"{name}_sum{{{labels}}}") / count * scale if count else None

    return {
        "images": delta("warn_stage_duration_seconds_count{stage=decode}"),
        "runs": delta("warn_batch_size_count{}"),
        "mean_batch": mean("warn_batch_size", scale=1),
        "run_ms": mean("warn_inference_duration_seconds"),
        "decode_ms": mean("warn_stage_duration_seconds", "stage=decode"),
        "model_ms": mean("warn_stage_duration_seconds", "stage=model"),
        # the shared session's process, where the workers share one: its runs (every worker's batches)
        "session_runs": delta("warn_shared_session_batch_size_count{}"),
        "session_batch": mean("warn_shared_session_batch_size", scale=1),
        "session_run_ms": mean("warn_shared_session_inference_duration_seconds"),
    }


class KServe:
    """KServe's ModelServer (bench/kserve_server.py) run by `python`, a Python that has kserve, on `model`:
    the v2 protocol over HTTP at `url` and over gRPC at `grpc_address`; `cuda` runs onnxruntime on CUDA."""

    def __init__(self, python: str, model: Path, name: str, threads: int, cuda: bool = False) -> None:
        port = Uvicorn.free_port()
        self.url, self.grpc_address = f"http://127.0.0.1:{port}", f"127.0.0.1:{port + 1}"
        self.log = tempfile.TemporaryFile()
        args = [python, str(ROOT / "bench/kserve_server.py"), str(model), name, str(port), str(threads)]
        self.proc = subprocess.Popen(args + (["cuda"] if cuda else []), stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_until_answered(
                self.proc, f"{self.url}/v2/models/{name}/ready", f"KServe ({python})", lambda: last_line(self.log)
            )
        except TimeoutError:
            self.stop()
            raise

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


def jpegs_of(photo, sides: tuple[int, ...] = (640, 1600, 4000)) -> dict[int, bytes]:
    """`photo` (a PIL RGB image) resized to each side x 3/4 of it, as quality-90 JPEGs: row 9's inputs."""
    from PIL import Image

    out = {}
    for side in sides:
        buf = io.BytesIO()
        photo.resize((side, side * 3 // 4), Image.BILINEAR).save(buf, "JPEG", quality=90)
        out[side] = buf.getvalue()
    return out


def bench_images(work: Path) -> dict[str, tuple[Path, str]]:
    """The three inputs of the service rows: the README's PNG, a real photo, and a 12-megapixel JPEG."""
    from importlib.resources import files

    from PIL import Image

    china = (files("sklearn.datasets") / "images" / "china.jpg").read_bytes()  # a 640x427 photo
    (work / "digit.png").write_bytes((ROOT / "docs/digit.png").read_bytes())
    (work / "photo.jpg").write_bytes(china)
    big = Image.open(io.BytesIO(china)).convert("RGB").resize((4000, 3000), Image.BICUBIC)
    big.save(work / "big.jpg", quality=90)
    return {
        "digit.png (640x400 PNG)": (work / "digit.png", "image/png"),
        "photo (640x427 JPEG)": (work / "photo.jpg", "image/jpeg"),
        "4000x3000 JPEG": (work / "big.jpg", "image/jpeg"),
    }
