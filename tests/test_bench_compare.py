"""bench.compare's settings for the service under test (`--after-env`): one revision, two settings."""

import argparse

import pytest

from bench import compare


def test_a_setting_is_a_name_and_a_value():
    assert compare.setting("WARN_SHARED_SESSION=true") == ("WARN_SHARED_SESSION", "true")
    assert compare.setting('WARN_CORS_ORIGINS=["a=b"]') == ("WARN_CORS_ORIGINS", '["a=b"]')


@pytest.mark.parametrize("text", ["WARN_SHARED_SESSION", "=true", ""])
def test_a_setting_without_a_name_or_a_value_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        compare.setting(text)


def test_the_setting_reaches_only_the_service_it_is_given_to(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(compare, "Uvicorn", lambda app, env, launcher, cwd: started.append(env))
    compare.serve(tmp_path)
    compare.serve(tmp_path, **dict([compare.setting("WARN_SHARED_SESSION=true")]))
    assert "WARN_SHARED_SESSION" not in started[0] and started[1]["WARN_SHARED_SESSION"] == "true"


def test_the_table_gives_each_side_its_medians_and_cpu_per_request():
    def run(req_s: float, cpu_ms: float, p50_ms: float) -> dict:
        return {"req_s": req_s, "p50_ms": p50_ms, "p99_ms": 2 * p50_ms + 10, "cpu_ms": cpu_ms}

    turns = {
        ("photo", "8"): {
            "before": [run(100, 10, 40), run(90, 11, 40), run(110, 12, 40)],
            "after": [run(120, 9, 35), run(130, 8, 30), run(125, 7, 25)],
        },
        ("photo", "paced"): {  # one request at a time: no CPU figure
            "before": [{"req_s": 20.0, "p50_ms": 12.0, "p99_ms": 15.0}],
            "after": [{"req_s": 21.0, "p50_ms": 11.0, "p99_ms": 14.0}],
        },
    }
    rows = compare.table(turns, "abc123").splitlines()
    assert rows[2] == "| photo | 8 | 100.0, 40.0 ms, 90 ms, 11.00 ms CPU | 125.0, 30.0 ms, 70 ms, 8.00 ms CPU | 1.25x |"
    assert rows[3] == "| photo | paced | 20.0, 12.0 ms, 15 ms | 21.0, 11.0 ms, 14 ms | 1.05x |"
    # answers that were not 2xx are counted in wrk's rate: a side that had any says how many
    turns[("photo", "8")]["after"][1]["non_2xx"] = 43
    assert "8.00 ms CPU, **43 not 2xx** | 1.25x" in compare.table(turns, "abc123").splitlines()[2]


def test_a_revision_git_cannot_check_out_is_refused_and_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setattr(compare.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(compare, "bench_images", lambda work: {})  # the images are not what this is about
    monkeypatch.setattr("sys.argv", ["compare", "no-such-revision-0123", "--connections", "paced"])
    with pytest.raises(SystemExit) as e:
        compare.main()
    assert e.value.code == 2  # argparse's error
    assert list(tmp_path.iterdir()) == []


def test_the_v2_load_is_the_request_tritonclient_sends(tmp_path):
    import json
    from pathlib import Path

    import numpy as np

    from service.tensors import read_inputs, split_body

    digit = Path(__file__).resolve().parents[1] / "docs/digit.png"
    length, model = compare.v2_body(digit, tmp_path / "v2.bin")
    body = (tmp_path / "v2.bin").read_bytes()
    header, binary = split_body(body, str(length))
    (tensor,) = read_inputs(header, binary, 3 * 48 * 48, 1)
    assert model == "warn-cluttered-digits" and json.loads(body[:length]) == header
    assert tensor.data.shape == (1, 3, 48, 48) and 0 <= float(np.min(tensor.data)) <= float(np.max(tensor.data)) <= 1
    assert header["outputs"] == [{"name": "probabilities", "parameters": {"binary_data": True}}]


def test_the_gc_hook_reports_each_collection_of_the_process_it_is_loaded_into(tmp_path):
    import json
    import os
    import subprocess
    import sys

    # collects, then waits (up to a minute, on a slow machine) for the hook to write after that
    code = (
        "import gc, os, time\n"
        "gc.collect(); gc.collect(1); collected = time.time()\n"
        "path = os.path.join(os.environ['BENCH_GC_DIR'], f'{os.getpid()}.json')\n"
        "deadline = time.monotonic() + 60\n"
        "while time.monotonic() < deadline and not (os.path.exists(path) and os.path.getmtime(path) > collected):\n"
        "    time.sleep(0.1)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(compare.GC_HOOK), "BENCH_GC_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, check=True)
    (written,) = tmp_path.glob("*.json")
    report = json.loads(written.read_text())
    assert done.returncode == 0 and report["counts"][1] >= 1 and report["counts"][2] >= 1
    assert sum(report["seconds"]) > 0


def test_gc_time_is_per_request_over_every_worker_and_its_longest_pause_is_of_the_turn_alone():
    before = {1: {"seconds": [0.1, 0.0, 0.5], "pauses": [(2, 0.5)]}}
    after = {
        1: {"seconds": [0.2, 0.0, 0.55], "pauses": [(2, 0.5), (2, 0.05)]},
        2: {"seconds": [0.05, 0.0, 0.0], "pauses": [(0, 0.002)]},  # a worker the first snapshot missed
    }
    turn = compare.gc_turn(before, after, requests=1000)
    assert turn["gc_ms"] == pytest.approx((0.1 + 0.05 + 0.05) / 1000 * 1e3)
    assert turn["gc_longest_ms"] == pytest.approx(50.0)  # the 0.5 s pause was before the turn
    turns = {
        ("photo", "32"): {
            side: [{"req_s": 1.0, "p50_ms": 1.0, "p99_ms": 1.0, "cpu_ms": 1.0, **turn}] for side in compare.SIDES
        }
    }
    assert "1.00 ms CPU (GC 0.200 ms, longest 50 ms)" in compare.table(turns, "abc123").splitlines()[2]
