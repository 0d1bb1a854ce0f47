"""The Grafana dashboard and Prometheus scrape config under docker/ ask only for what the service exports."""

import json
import re

import httpx
import numpy as np
import tritonclient.grpc as tc
import yaml

from tests.serving.conftest import ROOT, Server, free_port

GRAFANA = ROOT / "docker/grafana"
PROMQL_WORDS = {
    "sum", "rate", "histogram_quantile", "by", "without", "le", "label_values", "avg", "max", "min",
    "count", "irate", "increase", "on", "ignoring", "and", "or", "unless",
}  # fmt: skip


def exported(text: str) -> dict[str, set[str]]:
    """Each sample name in a /metrics exposition, with the labels it carries."""
    names: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*?)\})?\s", line)
            labels = set(re.findall(r"(\w+)=", m[2] or ""))
            names.setdefault(m[1], set()).update(labels)
    return names


def queries(dashboard: dict) -> list[str]:
    found = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    found += [v["definition"] for v in dashboard["templating"]["list"]]
    return found


def test_dashboard_asks_only_for_exported_metrics(model_path):
    server = Server({"WARN_MODEL_PATH": str(model_path), "WARN_GRPC_PORT": str(port := free_port())})
    try:
        server.wait_ready()
        image = (ROOT / "docs/digit.png").read_bytes()
        httpx.post(f"{server.url}/v1/predict", content=image, headers={"content-type": "image/png"}).raise_for_status()
        with tc.InferenceServerClient(f"127.0.0.1:{port}") as client:
            x = tc.InferInput("image", [1, 3, 48, 48], "FP32")
            x.set_data_from_numpy(np.zeros((1, 3, 48, 48), np.float32))
            client.infer("warn-cluttered-digits", [x])
        metrics = exported(httpx.get(f"{server.url}/metrics").text)
    finally:
        server.stop()
    dashboard = json.loads((GRAFANA / "dashboards/warn.json").read_text())
    exprs = queries(dashboard)
    assert len(exprs) >= 10
    used = set()
    for expr in exprs:
        without_strings = re.sub(r'"[^"]*"', '""', expr)
        for name in re.findall(r"\b([a-z_][a-z0-9_:]*)\b", without_strings):
            if name in PROMQL_WORDS or name.startswith("__"):
                continue
            if name.startswith("warn_"):
                assert name in metrics, f"{name} (in {expr!r}) is not in /metrics"
                used.add(name)
            else:  # a label: in a selector or a by (...) clause, of a metric this query names
                carried = set().union(*(metrics[m] for m in re.findall(r"\bwarn_\w+", expr)), {"le"})
                assert name in carried, f"label {name!r} (in {expr!r}) is not on those metrics"
    # every panel named in the issue has its data
    for metric in (
        "warn_http_requests_total",
        "warn_http_request_duration_seconds_bucket",
        "warn_batch_size_bucket",
        "warn_queue_depth",
        "warn_inference_duration_seconds_bucket",
    ):
        assert metric in used
    # every panel reads the provisioned data source
    source = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])


def test_prometheus_scrapes_each_replica_where_the_service_serves_metrics():
    config = yaml.safe_load((ROOT / "docker/prometheus/prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    sd = job["dns_sd_configs"][0]
    assert sd["names"] == ["warn"] and sd["port"] == 8000  # the compose network alias of every replica
    source = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090"
