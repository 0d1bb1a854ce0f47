"""bench.gpu, checked where there is no GPU: profiling a variant, the peers, starting servers."""

import json
import time

import pytest

from bench import gpu


def test_py_spy_samples_the_process_without_pausing_it():
    argv = gpu.py_spy(1234, 2.6, "out/x.txt")
    assert argv[:4] == ["py-spy", "record", "-p", "1234"]
    assert argv[argv.index("-d") + 1] == "3" and "--nonblocking" in argv and argv[-2:] == ["-o", "out/x.txt"]
    native = gpu.py_spy(1234, 2.6, "out/x.txt", native=True)  # py-spy refuses --native with --nonblocking
    assert "--native" in native and "--nonblocking" not in native


def test_a_variant_label_becomes_a_file_name():
    assert gpu.slug("shared session, CUDA blocking sync") == "shared-session-cuda-blocking-sync"
    assert gpu.slug("../a b/") == "a-b"


def test_profile_without_py_spy_says_so(monkeypatch, capsys):
    monkeypatch.setattr(gpu.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit):
        gpu.main(["--profile", "--variant", "x:WARN_SHARED_SESSION=true"])
    assert "--profile needs py-spy" in capsys.readouterr().err


def test_peer_rows_put_ours_beside_the_peer():
    peer = {"connections": 16, "req_s": 50.0, "p50_ms": 300.0, "p99_ms": 600.0, "non_2xx": 0}
    ours = {"req_s": 400.0, "p50_ms": 30.0, "p99_ms": 150.0}
    row = {"row": "G9", **gpu.versus(peer, ours)}
    assert row["ratio"] == 8.0 and row["p99_ratio"] == 0.25
    lonely = {"row": "G10", **gpu.versus(peer, None)}
    m = {"date": "d", "gpu": "g", "driver": "v", "cores": 16, "cpu": "c", "onnxruntime": "1"}
    table = gpu.markdown(m, [row, lonely])
    assert "| G9 | /v1/predict, photo, vs the naive FastAPI + PyTorch app, 16 conn | ours 400.0 vs peer 50.0" in table
    assert "**8.00x**" in table and "(0.25x)" in table
    assert "| G10 | v2 infer" in table and "ours not measured" in table


def test_the_naive_peer_serves_here(tmp_path):
    """G9's peer on this host (torch on the CPU where there is no GPU): every request answered."""
    from bench.server import bench_images

    ours = {c: {"req_s": 10.0, "p50_ms": 1.0, "p99_ms": 2.0} for c in (1, 16, 64)}
    rows = gpu.naive_rows(bench_images(tmp_path), 0.3, ours)
    assert [r["connections"] for r in rows] == [1, 16, 64]
    assert all(r["row"] == "G9" and r["req_s"] > 0 and r["non_2xx"] == 0 and r["ratio"] > 0 for r in rows)


def test_the_v2_request_is_what_the_cpu_bench_sends():
    name, body, headers = gpu.v2_request()
    n = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:n])
    assert name == "warn-cluttered-digits"
    assert head["inputs"][0]["shape"] == [1, 3, 48, 48] and len(body) - n == 4 * 3 * 48 * 48


def test_a_server_that_dies_at_start_fails_at_once():
    """Not after the two minutes a server gets to answer: on a lent GPU host they cost device time."""
    from bench.server import Uvicorn

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="no_such_module:app exited with [1-9]"):
        Uvicorn("no_such_module:app", {})
    assert time.monotonic() - started < 60


def test_kserve_that_cannot_start_says_why_at_once():
    """G10 given a Python without kserve: the bench says so, not after two minutes."""
    import sys

    from bench.server import KServe

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="No module named 'kserve'"):
        KServe(sys.executable, gpu.DEFAULT_ONNX, "warn-cluttered-digits", 1, cuda=True)
    assert time.monotonic() - started < 60


def test_a_variant_can_serve_another_checkout(monkeypatch, tmp_path):
    """`checkout=PATH` runs that tree's service package, with the rest of the variant as its settings."""
    served = []

    class Server:
        def workers(self):
            return []

        def sessions(self):
            return []

        def stop(self):
            served.append("stopped")

    monkeypatch.setattr(gpu, "serve", lambda checkout, **env: served.append((checkout, env)) or Server())
    monkeypatch.setattr(gpu, "predict_load", lambda *args: {"req_s": 1.0})
    label, env = gpu.variant(f"before:checkout={tmp_path},WARN_STORE=memory")
    rows = gpu.variant_rows({"photo (640x427 JPEG)": (tmp_path / "p.jpg", "image/jpeg")}, 1, label, env)
    assert served == [(tmp_path, {"WARN_STORE": "memory"}), "stopped"]
    assert rows == [{"row": "G7", "variant": "before", "req_s": 1.0}]
    assert env == {"checkout": str(tmp_path), "WARN_STORE": "memory"}  # the caller's settings left as they were


def test_the_profile_samples_the_busiest_worker_where_it_runs():
    """A worker's threads mostly wait: its profile leaves idle samples out, and picks the worker that works."""

    class Server:
        calls = 0

        def workers(self):
            return [11, 12, 13]

        def cpu_by_process(self):
            Server.calls += 1
            return {11: 1.0 * Server.calls, 12: 3.0 * Server.calls, 13: 0.5 * Server.calls, 10: 9.0 * Server.calls}

    assert gpu.busiest(Server(), window=0) == 12  # 10 is the launcher, not a worker
    assert "--idle" not in gpu.py_spy(12, 2, "w.txt", idle=False) and "--idle" in gpu.py_spy(12, 2, "s.txt")
