"""One session for every worker (WARN_SHARED_SESSION): batches of several workers run together, each
gets its own rows back, and the process is guarded and restarted."""

import asyncio
import os
import re
import signal
import tempfile
import threading
import time
from multiprocessing import Pipe
from multiprocessing.connection import Client, Listener
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tc
from PIL import Image

from bench.server import scrape, stages
from service.errors import ModelUnavailable
from service.model import OnnxModel
from service.shared_session import Failed, RemoteModel, Runner, SharedSession, serve_connections
from tests.serving.conftest import Server, free_port, png


def rows(n: int, start: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32).reshape(n, 1)


def test_batches_sent_together_run_as_one_and_each_gets_its_own_rows():
    calls = []

    def run(batch):
        calls.append(len(batch))
        return {"double": batch * 2, "first": batch[:, 0]}

    runner = Runner(run, max_batch=8)
    ends = [Pipe() for _ in range(3)]  # (worker end, session end)
    for i, (_, session) in enumerate(ends):
        runner.pending.append((session, rows(i + 2, 10 * i)))  # 2 + 3 + 4 rows: the third does not fit
    runner.run(runner.take())
    assert calls == [5]
    for i, (worker, _) in enumerate(ends[:2]):
        got = worker.recv()
        np.testing.assert_array_equal(got["double"], rows(i + 2, 10 * i) * 2)
        np.testing.assert_array_equal(got["first"], rows(i + 2, 10 * i)[:, 0])
    assert not ends[2][0].poll(0.05)
    runner.run(runner.take())  # the one carried over runs next, alone
    assert calls == [5, 4]
    np.testing.assert_array_equal(ends[2][0].recv()["double"], rows(4, 20) * 2)


def test_a_failing_run_answers_each_of_its_batches_and_the_runner_goes_on():
    def run(batch):
        if len(batch) > 2:
            raise ValueError("boom")
        return {"y": batch}

    runner = Runner(run, max_batch=8)
    (w1, s1), (w2, s2) = Pipe(), Pipe()
    runner.pending.append((s1, rows(2, 0)))
    runner.pending.append((s2, rows(1, 5)))
    runner.run(runner.take())
    for worker in (w1, w2):
        reply = worker.recv()
        assert isinstance(reply, Failed) and "boom" in reply.message
    runner.pending.append((s1, rows(1, 7)))
    runner.pending.append((s2, np.zeros((1, 2), np.float32)))  # rows of another shape cannot be stacked
    runner.run(runner.take())
    assert isinstance(w1.recv(), Failed) and isinstance(w2.recv(), Failed)
    runner.pending.append((s1, rows(1, 7)))
    runner.run(runner.take())
    np.testing.assert_array_equal(w1.recv()["y"], rows(1, 7))


def test_a_worker_that_is_gone_does_not_stop_the_others_answers():
    runner = Runner(lambda b: {"y": b}, max_batch=8)
    (w1, s1), (w2, s2) = Pipe(), Pipe()
    w1.close()
    runner.pending.append((s1, rows(1, 0)))
    runner.pending.append((s2, rows(1, 1)))
    runner.run(runner.take())
    np.testing.assert_array_equal(w2.recv()["y"], rows(1, 1))


@pytest.fixture
def session(model_path, monkeypatch):
    monkeypatch.setenv("WARN_MODEL_PATH", str(model_path))
    monkeypatch.setenv("WARN_PROVIDERS", "CPUExecutionProvider")  # compared with a CPU session, also on GPU hosts
    s = SharedSession(startup_timeout_s=60)
    s.start()
    for name, value in s.env().items():
        monkeypatch.setenv(name, value)
    try:
        yield s
    finally:
        s.stop()


def test_the_shared_session_answers_as_a_session_of_its_own_would(session, model_path):
    remote = RemoteModel.from_env()
    local = OnnxModel(model_path, "CPUExecutionProvider")
    assert remote.info == local.info
    assert oct(os.stat(session.folder).st_mode & 0o777) == "0o700"
    x = np.random.default_rng(0).random((3, 3, *local.info.input_size), dtype=np.float32)
    got, want = remote.run(x), local.run(x)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_peer_without_the_key_is_refused_and_the_session_serves_on(session):
    with pytest.raises(Exception, match="digest"):  # multiprocessing's AuthenticationError
        Client(session.address, "AF_UNIX", authkey=b"not the key")
    remote = RemoteModel(session.address, session.key)
    assert remote.run(np.zeros((1, 3, *remote.info.input_size), np.float32))["probabilities"].shape[0] == 1


def test_a_killed_session_fails_its_batch_with_503_and_comes_back(session):
    remote = RemoteModel.from_env()
    x = np.zeros((1, 3, *remote.info.input_size), np.float32)
    remote.run(x)
    first = session.process.pid
    os.kill(first, signal.SIGKILL)
    with pytest.raises(ModelUnavailable) as failed:
        remote.run(x)
    assert failed.value.status == 503 and "retry" in failed.value.message
    deadline = time.monotonic() + 60
    while True:
        try:
            assert remote.run(x)["probabilities"].shape[0] == 1
            break
        except ModelUnavailable:
            assert time.monotonic() < deadline, "the session was not restarted"
            time.sleep(0.2)
    assert session.process.pid != first and session.restarts == 1


def test_workers_of_python_m_service_share_one_session(model_path, tmp_path):
    grpc_port = free_port()
    server = Server(
        {
            "WARN_MODEL_PATH": str(model_path),
            "WARN_WORKERS": "2",
            "WARN_SHARED_SESSION": "true",
            "WARN_STORE_DIR": str(tmp_path / "store"),
            "WARN_GRPC_PORT": str(grpc_port),
        },
        launcher=True,
    )
    try:
        server.wait_ready(90)
        before = scrape(server.url)
        images = [png(Image.new("RGB", (40 + i, 32), (5 * i, 200 - 3 * i, 90))) for i in range(24)]

        async def predict_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=8)) as http:
                return await asyncio.gather(
                    *(
                        http.post(f"{server.url}/v1/predict", content=im, headers={"content-type": "image/png"})
                        for im in images
                    )
                )

        answers = asyncio.run(predict_all())
        assert [a.status_code for a in answers] == [200] * len(images)
        # the v2 route, over HTTP and gRPC, reads the model's outputs through the shared session too
        x = np.random.default_rng(1).random((2, 3, 48, 48), dtype=np.float32)
        want = OnnxModel(model_path, "CPUExecutionProvider").run(x)["probabilities"]
        body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [2, 3, 48, 48], "data": x.ravel().tolist()}]}
        v2 = httpx.post(f"{server.url}/v2/models/warn-cluttered-digits/infer", json=body, timeout=60).json()
        got = {o["name"]: o for o in v2["outputs"]}["probabilities"]["data"]
        np.testing.assert_allclose(np.reshape(got, want.shape), want, atol=1e-5)
        with tc.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            tensor = tc.InferInput("image", [2, 3, 48, 48], "FP32")
            tensor.set_data_from_numpy(x)
            got = client.infer("warn-cluttered-digits", [tensor]).as_numpy("probabilities")
        np.testing.assert_allclose(got, want, atol=1e-5)
        images_in = len(images) + 4  # 24 photos, then two rows over HTTP and two over gRPC
        metrics = httpx.get(f"{server.url}/metrics").text
        shared = re.search(r"^warn_shared_session_batch_size_sum ([\d.e+]+)$", metrics, re.M)
        assert shared and float(shared.group(1)) == images_in  # every image ran in the shared session
        seen = stages(before, scrape(server.url))  # as bench.gpu reads a load
        assert seen["images"] == len(images) and 1 <= seen["session_runs"] <= images_in
        assert seen["session_batch"] * seen["session_runs"] == images_in and seen["session_run_ms"] > 0
        # the workers' sessions: none; only the one process holds the model
        named = [p for p in os.listdir("/proc") if p.isdigit() and _comm(p) == "warn-session"]
        ours = [p for p in named if _parent(p) == server.proc.pid]
        assert len(ours) == 1
        # the session dies: the request whose batch it held answers 503, and the service comes back
        os.kill(int(ours[0]), signal.SIGKILL)
        post = dict(content=images[0], headers={"content-type": "image/png"}, timeout=60)
        lost = httpx.post(f"{server.url}/v1/predict", **post)
        assert lost.status_code == 503 and lost.json()["code"] == "model_unavailable"
        assert lost.headers["retry-after"] == "1"
        # while the launcher replaces it, readiness says so, and a balancer sends requests elsewhere
        deadline = time.monotonic() + 30
        while (probe := httpx.get(f"{server.url}/v2/health/ready")).status_code != 503:
            assert time.monotonic() < deadline, "readiness never said the session was gone"
            time.sleep(0.02)
        assert probe.json() == {"ready": False}
        deadline = time.monotonic() + 60
        while httpx.post(f"{server.url}/v1/predict", **post).status_code != 200:
            assert time.monotonic() < deadline, "the service did not come back"
            time.sleep(0.2)
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
        assert httpx.get(f"{server.url}/v2/models/warn-cluttered-digits/ready").json()["ready"] is True
        ours = [p for p in os.listdir("/proc") if p.isdigit() and _comm(p) == "warn-session"]
        ours = [p for p in ours if _parent(p) == server.proc.pid]
        # SIGTERM to every process, as a container's stop sends it: the session outlives the workers' last
        # requests, then goes, unrestarted
        os.kill(int(ours[0]), signal.SIGTERM)
        time.sleep(1)
        output = server.stop_and_read()
        assert server.proc.returncode == 0 and output.count("restarting") == 1  # after the SIGKILL only
        assert not os.path.exists(f"/proc/{ours[0]}")
    finally:
        server.stop()


def _comm(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return ""


def _parent(pid: str) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])


def test_workers_without_a_shared_session_ignore_an_inherited_address(model_path, tmp_path):
    server = Server(
        {
            "WARN_MODEL_PATH": str(model_path),
            "WARN_WORKERS": "2",
            "WARN_STORE_DIR": str(tmp_path / "store"),
            "WARN_GRPC_PORT": "0",
            "WARN_SESSION_ADDRESS": str(tmp_path / "nothing-listens-here"),
            "WARN_SESSION_KEY": "00",
        },
        launcher=True,
    )
    try:
        server.wait_ready(90)
        image = png(Image.new("RGB", (32, 32)))
        answer = httpx.post(f"{server.url}/v1/predict", content=image, headers={"content-type": "image/png"})
        assert answer.status_code == 200
    finally:
        server.stop()


def test_a_model_the_shared_session_cannot_load_stops_the_start_with_why(tmp_path):
    def folders() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("warn-session-*"))

    before = folders()
    server = Server({"WARN_MODEL_PATH": str(tmp_path / "missing.onnx"), "WARN_SHARED_SESSION": "true"}, launcher=True)
    try:
        assert server.proc.wait(60) != 0
        output = server.output()
        assert "model file not found" in output and "cannot start" in output and "Traceback" not in output
        assert folders() <= before  # its socket folder is gone
    finally:
        server.stop()


@pytest.mark.parametrize("key", [None, "", "not hex", "é"])
def test_a_session_address_without_its_key_is_refused_with_why(monkeypatch, tmp_path, key):
    monkeypatch.setenv("WARN_SESSION_ADDRESS", str(tmp_path / "socket"))
    if key is None:
        monkeypatch.delenv("WARN_SESSION_KEY", raising=False)
    else:
        monkeypatch.setenv("WARN_SESSION_KEY", key)
    with pytest.raises(ModelUnavailable, match="WARN_SESSION_KEY"):
        RemoteModel.from_env()


def test_the_shared_session_is_on_by_itself_only_where_the_workers_would_use_a_gpu(monkeypatch):
    from service import model
    from service.config import Settings

    assert Settings(WORKERS=4).shared_session() is model.runs_on_cuda("auto")  # here: no GPU, so off
    monkeypatch.setattr(model, "cuda_devices", lambda: 1)
    monkeypatch.setattr(model, "choose_providers", lambda setting: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert Settings(WORKERS=4).shared_session()
    assert not Settings(WORKERS=1).shared_session()  # one worker: nothing to share
    monkeypatch.setattr(model, "cuda_devices", lambda: 0)  # onnxruntime-gpu on a host without a GPU
    assert not Settings(WORKERS=4).shared_session()
    monkeypatch.setenv("WARN_SHARED_SESSION", " AUTO ")
    assert Settings(WORKERS=4).SHARED_SESSION == "auto"
    monkeypatch.setenv("WARN_SHARED_SESSION", "maybe")
    with pytest.raises(ValueError, match="SHARED_SESSION"):
        Settings()
    monkeypatch.setenv("WARN_SHARED_SESSION", "true")
    assert Settings(WORKERS=4).shared_session() is True
    monkeypatch.setenv("WARN_SHARED_SESSION", "false")
    monkeypatch.setattr(model, "cuda_devices", lambda: 1)
    assert Settings(WORKERS=4).shared_session() is False


def gated_session(tmp_path: Path, runs: int = 2, **watch):
    """serve_connections in a thread, over a run that doubles its rows, and that waits for the returned gate
    when its first value is 1; and a function that connects a worker to it. `watch`: its stall_s and give_up."""
    gate = threading.Event()

    def run(batch):
        if batch[0, 0] == 1:
            gate.wait(10)
        return {"y": batch * 2}

    address, key = str(tmp_path / "socket"), os.urandom(16)
    listener = Listener(address, "AF_UNIX", authkey=key)
    serving = (listener, "info", Runner(run, 8), runs)
    threading.Thread(target=serve_connections, args=serving, kwargs=watch, daemon=True).start()

    def connect():
        conn = Client(address, "AF_UNIX", authkey=key)
        assert conn.recv() == "info"
        return conn

    return gate, connect


@pytest.mark.parametrize("runs", [1, 2])
def test_a_batch_is_answered_while_another_run_is_still_on_the_device(tmp_path, runs):
    """With two run threads, a second worker's batch does not wait for a slow run (SHARED_SESSION_RUNS)."""
    gate, connect = gated_session(tmp_path, runs)
    slow, quick = connect(), connect()
    slow.send(rows(1, 1))
    time.sleep(0.2)  # the slow batch is now in its run
    quick.send(rows(2, 5))
    answered_first = quick.poll(2)
    gate.set()
    np.testing.assert_array_equal(slow.recv()["y"], rows(1, 1) * 2)
    np.testing.assert_array_equal(quick.recv()["y"], rows(2, 5) * 2)
    assert answered_first == (runs == 2)


def test_a_worker_that_hangs_up_mid_run_leaves_the_session_serving_the_others(tmp_path):
    gate, connect = gated_session(tmp_path)
    gone, other = connect(), connect()
    gone.send(rows(1, 1))
    time.sleep(0.2)
    gone.close()  # its batch is still running
    gate.set()
    for start in (5, 9):  # answered, and answered again after the run that lost its worker
        other.send(rows(2, start))
        assert other.poll(5)
        np.testing.assert_array_equal(other.recv()["y"], rows(2, start) * 2)
    late = connect()
    late.send(rows(1, 3))
    assert late.poll(5) and late.recv()["y"][0, 0] == 6


def test_a_run_past_the_model_timeout_gives_the_session_up_and_quick_runs_do_not(tmp_path):
    """A hung run cannot be interrupted; the session's process gives itself up (and is restarted) once one has
    gone on past WARN_MODEL_TIMEOUT_S."""
    given_up: list[float] = []
    gate, connect = gated_session(tmp_path, stall_s=0.4, give_up=given_up.append)
    worker = connect()
    for start in (2, 5, 8):  # quick runs, one after another for longer than stall_s in all
        worker.send(rows(1, start))
        assert worker.poll(5) and worker.recv()["y"][0, 0] == 2 * start
        time.sleep(0.2)
    assert given_up == []
    worker.send(rows(1, 1))  # hangs until the gate
    deadline = time.monotonic() + 5
    while not given_up and time.monotonic() < deadline:
        time.sleep(0.02)
    gate.set()
    assert len(given_up) == 1 and 0.4 < given_up[0] < 2


def test_a_worker_waits_for_a_shared_run_as_long_as_the_model_timeout_allows(monkeypatch, tmp_path):
    monkeypatch.setenv("WARN_SESSION_ADDRESS", str(tmp_path / "socket"))
    monkeypatch.setenv("WARN_SESSION_KEY", os.urandom(16).hex())
    monkeypatch.setattr(RemoteModel, "_connect", lambda self: SimpleNamespace(outputs=[]))
    assert RemoteModel.from_env(90).reply_timeout_s > 90
    assert RemoteModel.from_env(1).reply_timeout_s < 60
