"""Several worker processes behind one port: every overlay URL is served whichever worker answers it."""

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tc
from PIL import Image

from tests.serving.conftest import Server, free_port, png


def test_two_workers_share_predictions_and_metrics(model_path, tmp_path):
    """With an API key: the overlay URLs are signed by one worker and opened, without the key, at any."""
    key = {"authorization": "Bearer s3cret"}
    env = {
        "WARN_API_KEY": "s3cret",
        "WARN_MODEL_PATH": str(model_path),
        "WARN_WORKERS": "2",
        "WARN_STORE": "disk",
        "WARN_STORE_WRITER": "true",  # on CPU hosts off unless asked for
        "WARN_STORE_DIR": str(tmp_path / "store"),
        "WARN_GRPC_PORT": str(free_port()),
    }
    server = Server(env, launcher=True)
    try:
        server.wait_ready(90)
        images = [png(Image.new("RGB", (40 + i, 32), (5 * i, 200 - 3 * i, 90))) for i in range(50)]

        async def main():
            limits = httpx.Limits(max_connections=8)
            async with httpx.AsyncClient(timeout=60, limits=limits) as http:
                sem = asyncio.Semaphore(8)

                async def predict(image: bytes) -> httpx.Response:
                    async with sem:
                        return await http.post(
                            f"{server.url}/v1/predict", content=image, headers={"content-type": "image/png", **key}
                        )

                answers = await asyncio.gather(*(predict(im) for im in images))
                urls = [u for a in answers for u in a.json()["attention_urls"].values()]

                async def fetch(url: str) -> httpx.Response:
                    async with sem:
                        # a fresh connection each time, so the kernel spreads them over the workers
                        async with httpx.AsyncClient(timeout=60) as fresh:
                            return await fresh.get(httpx.URL(url).copy_merge_params({"max_size": 64}))

                overlays = await asyncio.gather(*(fetch(u) for u in urls))
                metrics = (await http.get(f"{server.url}/metrics")).text
                return answers, overlays, metrics

        answers, overlays, metrics = asyncio.run(main())
        (writer,) = named_children(server, "warn-store")
        assert f"the store writer for every worker, in process {writer}" in server.output()
        tasks = Path(f"/proc/{writer}/task").iterdir()
        relays = [t for t in tasks if (t / "comm").read_text().strip() == "store-relay"]
        # a relay thread per worker that stored a prediction (the kernel may give one worker every connection)
        assert 1 <= len(relays) <= 2
        # the workers share the gRPC port too; fresh channels land on either
        for _ in range(6):
            with tc.InferenceServerClient(f"127.0.0.1:{env['WARN_GRPC_PORT']}") as client:
                x = tc.InferInput("image", [1, 3, 48, 48], "FP32")
                x.set_data_from_numpy(np.zeros((1, 3, 48, 48), np.float32))
                answer = client.infer("warn-cluttered-digits", [x], headers=key)
                assert answer.as_numpy("probabilities").shape == (1, 11)
        assert [a.status_code for a in answers] == [200] * 50
        assert all("signature=" in u for a in answers for u in a.json()["attention_urls"].values())
        assert len(overlays) == 50 * 4 and {o.status_code for o in overlays} == {200}
        assert all(o.headers["content-type"] == "image/png" for o in overlays)
        # both workers served, and /metrics adds up their counts
        pids = set(re.findall(r"Started server process \[(\d+)\]", server.stop_and_read()))
        assert len(pids) == 2, f"expected two workers, saw {pids}"
        images_total = re.search(r"^warn_images_total ([\d.e+]+)$", metrics, re.M)
        assert images_total and float(images_total.group(1)) == 50
    finally:
        server.stop()


def named_children(server: Server, name: str) -> list[int]:
    """The server's child processes that the OS knows by `name`."""
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    return [int(p) for p in children if Path(f"/proc/{p}/comm").read_text().strip() == name]


def connections_by_worker(server: Server) -> dict[int, int]:
    """Established connections to the server's port, counted by the worker process that holds them."""
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == server.port and fields[3] == "01":
                established.add(fields[9])  # the socket's inode
    counts = {}
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    for pid in map(int, children):
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:  # closed since it was listed
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
        if held := len(inodes & established):
            counts[pid] = held
    return counts


def listening_sockets(server: Server) -> int:
    return sum(
        int(fields[1].rsplit(":", 1)[1], 16) == server.port and fields[3] == "0A"  # LISTEN
        for table in ("/proc/net/tcp", "/proc/net/tcp6")
        for fields in (line.split() for line in Path(table).read_text().splitlines()[1:])
    )


def test_a_burst_of_connections_spreads_over_every_worker(model_path):
    """A pool that opens its connections at once (wrk, aiohttp, a proxy) reaches every worker, not the
    first to wake: with one shared socket, a waking worker accepts every connection waiting."""
    pool = []
    env = {
        "WARN_MODEL_PATH": str(model_path),
        "WARN_WORKERS": "4",
        "WARN_GRPC_PORT": "0",
    }
    server = Server(env, launcher=True)
    try:
        server.wait_ready(90)
        deadline = time.monotonic() + 90
        while server.output().count("Application startup complete") < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert named_children(server, "warn-store") == []  # on the CPU (auto), each worker writes itself
        pool = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(64)]
        for conn in pool:
            conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n\r\n")
        for conn in pool:
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        counts = connections_by_worker(server)
        assert sum(counts.values()) == 64
        assert listening_sockets(server) == 4  # a socket of its own per worker, none shared
        # hashed evenly, a worker gets none or half of them about once in ten million runs
        assert len(counts) == 4 and max(counts.values()) <= 32, f"per worker: {sorted(counts.values())}"
    finally:
        for conn in pool:
            conn.close()
        server.stop()


PINNED_THREADS = """
import os, sys
import numpy as np
from service.config import Settings
from service.model import OnnxModel

s = Settings(WORKERS=2, MODEL_PATH=sys.argv[1])
model = OnnxModel(s.MODEL_PATH, "CPUExecutionProvider", s.intra_op_threads(), spin=False)
h, w = model.info.input_size
model.run(np.zeros((8, 3, h, w), np.float32))
allowed = os.sched_getaffinity(0)
print([t for t in os.listdir("/proc/self/task") if os.sched_getaffinity(int(t)) != allowed])
"""


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or (os.cpu_count() or 1) < 2, reason="Linux, 2+ cores")
def test_a_worker_of_several_pins_no_thread_to_a_core(model_path):
    """Left at its default size, onnxruntime's pool pins its threads to cores 1..n-1, the same cores in
    every worker process, so the workers' threads would queue on those cores."""
    out = subprocess.run(
        [sys.executable, "-c", PINNED_THREADS, str(model_path)], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_each_worker_of_several_sizes_its_session_by_its_share_of_the_cores():
    from service.config import Settings, cores

    cores = cores()
    assert Settings(WORKERS=1).intra_op_threads() == 0  # one process alone: onnxruntime's default
    assert Settings(WORKERS=2).intra_op_threads() == max(1, cores // 2)
    assert Settings(WORKERS=cores * 2).intra_op_threads() == 1
    assert Settings(WORKERS=2, INTRA_OP_THREADS=3).intra_op_threads() == 3


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="Linux, 2+ cores")
def test_one_per_core_counts_the_cores_this_process_may_use():
    """A cpuset (`docker run --cpuset-cpus`, taskset) leaves fewer cores than the host has, as a CPU quota
    does; os.cpu_count() sees neither, and would start a worker for every core of the host."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from service.config import Settings; s = Settings(); print(s.workers(), s.decode_threads(), os.cpu_count())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARN_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, check=True)
    workers, decoders, host = map(int, out.stdout.split())
    assert (workers, decoders) == (1, 2) and host >= 2


CLAIMS = """
import os, sys
from service import workers

every = os.sched_getaffinity(0)
claims = []
for _ in range(3):  # three workers' claims, each made with every CPU allowed, as a new worker has
    claims.append(workers.claim_core(sys.argv[1]))
    claims.append(sorted(os.sched_getaffinity(0)))
    os.sched_setaffinity(0, every)
workers._claimed.pop(0)[1].close()  # the first worker dies: the kernel drops its lock
claims.append(workers.claim_core(sys.argv[1]))
print(claims)
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="Linux, 2+ cores")
def test_each_worker_claims_a_core_no_other_holds_and_a_dead_ones_core_is_claimed_again(tmp_path):
    a, b = sorted(os.sched_getaffinity(0))[:2]
    out = subprocess.run(
        [sys.executable, "-c", CLAIMS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {a, b}),
    )
    assert out.stdout.strip() == str([a, [a], b, [b], None, [a, b], a]), out.stdout + out.stderr


def test_workers_are_pinned_only_where_each_has_a_core_of_its_own():
    from service.config import Settings

    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    assert not Settings(WORKERS=allowed).pinned()  # off unless asked for
    assert Settings(WORKERS=allowed, PIN_WORKERS=True).pinned() == (allowed > 1)
    assert not Settings(WORKERS=allowed, PIN_WORKERS=True, INTRA_OP_THREADS=2).pinned()  # threads would queue
    assert not Settings(WORKERS=allowed + 1, PIN_WORKERS=True).pinned()  # more workers than CPUs
    assert not Settings(WORKERS=1, PIN_WORKERS=True).pinned()
    # under a CPU quota (`docker run --cpus`, a Kubernetes limit) the process may run on every CPU of the
    # host, which other containers share: one worker per core of the quota is fewer workers than CPUs
    assert not Settings(WORKERS=max(1, allowed - 1), PIN_WORKERS=True).pinned()


def worker_pids(server: Server) -> list[int]:
    """The server's worker processes (multiprocessing's resource tracker and the store writer left out)."""
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    writers = named_children(server, "warn-store")
    return [
        int(p)
        for p in children
        if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes() and int(p) not in writers
    ]


def cpus_of(pid: int) -> set[frozenset[int]]:
    """The CPU sets of every thread of a process."""
    return {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="Linux, 2+ cores")
def test_one_worker_per_core_runs_each_on_a_core_of_its_own(model_path):
    """`python -m service` on two CPUs (a cpuset of two) with WARN_PIN_WORKERS: two workers, each with every
    thread on its own CPU; a worker started in place of a killed one runs on the CPU it left."""
    two = set(sorted(os.sched_getaffinity(0))[:2])
    env = {"WARN_MODEL_PATH": str(model_path), "WARN_GRPC_PORT": "0", "WARN_PIN_WORKERS": "true"}
    server = Server(env, launcher=True, cpus=two)
    try:
        server.wait_ready(90)
        deadline = time.monotonic() + 90
        while server.output().count("Application startup complete") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = worker_pids(server)
        assert len(pids) == 2
        each = [cpus_of(pid) for pid in pids]
        assert all(len(threads) == 1 for threads in each), each  # every thread of a worker on the same CPUs
        assert {cpus for (cpus,) in each} == {frozenset({c}) for c in two}, each  # one CPU each, not the same
        assert server.output().count(" runs on CPU ") == 2
        killed, kept = pids
        left = next(iter(cpus_of(killed)))
        os.kill(killed, 9)
        while time.monotonic() < deadline and (len(worker_pids(server)) < 2 or killed in worker_pids(server)):
            time.sleep(0.2)
        (replacement,) = set(worker_pids(server)) - {kept}
        while server.output().count(" runs on CPU ") < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cpus_of(replacement) == {left}
    finally:
        server.stop()


HANGING_RUNS = """
import os, time
import service.model as model

run = model.OnnxModel.run


def hanging_run(self, batch):
    if os.path.exists(os.environ["HANG_WHILE"]):
        time.sleep(3600)  # a GPU that stopped answering
    return run(self, batch)


model.OnnxModel.run = hanging_run
"""


DIGIT = (Path(__file__).parents[2] / "docs/digit.png").read_bytes()


def hanging_workers(model_path: Path, tmp_path: Path, timeout_s: int) -> tuple[Server, Path]:
    """`python -m service` with two workers, each with a session of its own, whose runs hang while the returned
    file exists (the hook is in every process the launcher spawns)."""
    (tmp_path / "sitecustomize.py").write_text(HANGING_RUNS)
    flag = tmp_path / "hang"
    env = {
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "HANG_WHILE": str(flag),
        "WARN_MODEL_PATH": str(model_path),
        "WARN_WORKERS": "2",
        "WARN_SHARED_SESSION": "false",
        "WARN_MODEL_TIMEOUT_S": str(timeout_s),
        "WARN_GRPC_PORT": "0",
    }
    return Server(env, launcher=True), flag


def predict_anywhere(server: Server) -> httpx.Response:
    headers = {"content-type": "image/png", "connection": "close"}  # a new connection: either worker
    return httpx.post(f"{server.url}/v1/predict", content=DIGIT, headers=headers, timeout=30)


def test_a_worker_whose_own_session_hangs_gives_up_and_is_replaced(model_path, tmp_path):
    """A run cannot be interrupted; past twice WARN_MODEL_TIMEOUT_S on one, a worker of several exits and
    uvicorn's supervisor starts another, which serves again."""
    server, flag = hanging_workers(model_path, tmp_path, timeout_s=1)
    try:
        server.wait_ready(90)
        flag.touch()
        timed_out = predict_anywhere(server)
        deadline = time.monotonic() + 30
        while "the worker exits (code 70)" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        flag.unlink()
        while "died" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        answers = []
        while time.monotonic() < deadline and len(answers) < 6:  # both workers, the new one included, serve
            answers.append(predict_anywhere(server).status_code)
            if answers[-1] != 200:
                answers.clear()
                time.sleep(0.2)
        output = server.stop_and_read()
    finally:
        server.stop()
    assert timed_out.status_code == 504 and timed_out.json()["code"] == "model_timeout"
    assert re.search(r"on one run for \d+ s, 2 times WARN_MODEL_TIMEOUT_S", output), output[-3000:]
    assert re.search(r"Child process \[\d+\] died", output), output[-3000:]
    assert answers == [200] * 6


def test_a_worker_stuck_on_a_hung_run_still_stops_when_asked(model_path, tmp_path):
    """Stopping waits for the inference thread, which a hung run holds for good: the launcher, waiting for
    that worker, had not exited a minute later. A worker whose run has gone on past WARN_MODEL_TIMEOUT_S exits
    without it (0.3 s)."""
    server, flag = hanging_workers(model_path, tmp_path, timeout_s=5)  # gives up by itself only at 10 s
    try:
        server.wait_ready(90)
        flag.touch()
        with ThreadPoolExecutor(6) as clients:  # one runs alone, the next wait for the inference thread
            codes = [r.status_code for r in clients.map(lambda _: predict_anywhere(server), range(6))]
        asked = time.monotonic()
        server.proc.terminate()
        try:
            server.proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        took = time.monotonic() - asked
    finally:
        server.stop()
    output = server.output()
    assert codes == [504] * 6
    assert "and the worker is asked to stop: the worker exits (code 70)" in output, output[-3000:]
    assert took < 5, f"the launcher took {took:.1f} s to stop"
