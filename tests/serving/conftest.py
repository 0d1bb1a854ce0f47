import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.config import DEFAULT_MODEL, Settings
from service.main import create_app

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def model_path() -> Path:
    assert DEFAULT_MODEL.is_file(), "the committed default model is missing"
    return DEFAULT_MODEL


def make_client(model_path: Path, **overrides) -> TestClient:
    return TestClient(create_app(Settings(MODEL_PATH=model_path, **overrides)))


@pytest.fixture(scope="module")
def client(model_path):
    with make_client(model_path, STORE_TTL_S=600) as c:
        yield c


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The app on real uvicorn; `launcher=True` starts it as `make serve` and the image do (`python -m service`)."""

    def __init__(
        self, env: dict[str, str], python: str = sys.executable, launcher: bool = False, cpus: set[int] | None = None
    ) -> None:
        self.port = free_port()
        while str(self.port) == env.get("WARN_GRPC_PORT"):  # the kernel may offer a just-released port again
            self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        module = ["service"] if launcher else ["uvicorn", "service.main:app"]
        # a file, not a pipe: an unread pipe fills with the access log and blocks the server
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [python, "-m", *module, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,  # as taskset or a cpuset would
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def stop_and_read(self) -> str:
        """Stops the server; returns everything it printed."""
        self.stop()
        return self.output()

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def server(model_path):
    s = Server({"WARN_MODEL_PATH": str(model_path), "WARN_MAX_WAIT_MS": "5"})
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(autouse=True)
def restore_pillow_pixel_limit():
    """create_app sets Pillow's process-wide pixel limit from its settings; tests with small limits
    must not leave theirs to the tests after them."""
    saved = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = saved
