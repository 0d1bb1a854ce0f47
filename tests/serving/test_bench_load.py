"""bench.load, the load generator for hosts without wrk: it counts what the service answered."""

from pathlib import Path

import pytest

from bench import load

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("connections", [1, 3])
def test_counts_answers_and_their_latency(server, connections, monkeypatch):
    monkeypatch.setattr(load, "PER_PROCESS", 2)  # 3 connections: two load processes
    r = load.measure(server.url + "/v1/predict", (ROOT / "docs/digit.png").read_bytes(), "image/png", connections, 0.5)
    assert r["codes"].keys() == {"200"} and r["non_2xx"] == 0
    assert r["req_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
    assert r["connections"] == connections and r["client_cpu"] > 0


def test_counts_refusals_by_status(server):
    r = load.measure(server.url + "/v1/predict", b"not an image", "image/png", 1, 0.3)
    assert r["non_2xx"] == sum(r["codes"].values()) > 0
    assert set(r["codes"]) == {"415"}


def test_the_service_metrics_say_where_a_load_went(server):
    from bench.server import scrape, stages

    before = scrape(server.url)
    r = load.measure(server.url + "/v1/predict", (ROOT / "docs/digit.png").read_bytes(), "image/png", 2, 0.5)
    seen = stages(before, scrape(server.url))
    assert seen["images"] == r["codes"]["200"]  # every answered image, and no earlier one
    assert 1 <= seen["runs"] <= seen["images"] and 1 <= seen["mean_batch"] <= 2
    assert 0 < seen["run_ms"] and 0 < seen["decode_ms"] and 0 < seen["model_ms"]
