"""Every answer carries X-Request-ID: the client's own where it is plain, else one the service made."""

import logging
import re

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.config import Settings
from service.main import create_app
from tests.serving.conftest import make_client, png

HEX32 = re.compile(r"[0-9a-f]{32}")


def test_every_answer_has_an_id_of_its_own(client):
    digit = png(Image.new("RGB", (8, 8)))
    answers = [
        client.post("/v1/predict", content=digit, headers={"content-type": "image/png"}),
        client.get("/v1/predictions/nope"),  # 404
        client.get("/v1/predictions/nope/attention/combined.png?alpha=2"),  # 422
        client.post("/v1/predict", content=b"x", headers={"content-type": "text/plain"}),  # 415
        client.head("/v1/model"),
        client.get("/v2/health/ready"),
        client.get("/metrics"),
    ]
    ids = [r.headers.get("x-request-id", "") for r in answers]
    assert all(HEX32.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids)
    assert [r.status_code for r in answers] == [200, 404, 422, 415, 200, 200, 200]


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("7f3c2a1e-9b4d-4c8e-a1f2-0d3e4b5c6a7f", True),  # a UUID
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", True),  # a W3C traceparent
        ("nginx.3a9f+req=1", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("two words", False),
        ("id\twith-tab", False),
        ("", False),
        ("é", False),
    ],
)
def test_a_plain_client_id_is_kept_and_any_other_replaced(client, sent, kept):
    r = client.get("/v2/health/live", headers={"x-request-id": sent.encode("utf-8")})
    got = r.headers["x-request-id"]
    assert got == sent if kept else HEX32.fullmatch(got), got


def test_a_500_names_its_request_id_in_the_body_and_the_log(model_path, caplog):
    app = create_app(Settings(MODEL_PATH=model_path, STORE="memory", GRPC_PORT=0))
    with TestClient(app, raise_server_exceptions=False) as c:  # as a real server: logged, not raised
        c.app.state.runtime.batcher._run = lambda x: 1 / 0
        with caplog.at_level(logging.ERROR, logger="service.errors"):
            r = c.post(
                "/v1/predict",
                content=png(Image.new("RGB", (8, 8))),
                headers={"content-type": "image/png", "x-request-id": "client-42"},
            )
    assert r.status_code == 500 and r.headers["x-request-id"] == "client-42"
    assert r.json()["request_id"] == "client-42" and "client-42" in r.json()["error"]
    logged = [rec for rec in caplog.records if "client-42" in rec.getMessage()]
    assert logged and logged[0].exc_info and logged[0].exc_info[0] is ZeroDivisionError


def test_cors_lets_a_page_read_the_id(model_path):
    with make_client(model_path, CORS_ORIGINS=["https://dash.example"], GRPC_PORT=0) as c:
        r = c.get("/v2/health/live", headers={"origin": "https://dash.example"})
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


def test_uvicorns_access_line_ends_with_the_request_id(model_path):
    """The line uvicorn logs for each request names the id its answer carries: the client's own, or the
    one the service made; a forged id never reaches the log."""
    import httpx

    from tests.serving.conftest import Server

    server = Server({"WARN_MODEL_PATH": str(model_path), "WARN_GRPC_PORT": "0"})
    try:
        server.wait_ready()
        given = httpx.get(f"{server.url}/v1/model", headers={"x-request-id": "client-7f3c2a1e"})
        made = httpx.get(f"{server.url}/v1/predictions/nope")
        forged = httpx.get(f"{server.url}/v2/health/live", headers={"x-request-id": 'a" 200 x'})
        out = server.stop_and_read()
    finally:
        server.stop()
    lines = [line for line in out.splitlines() if '" 2' in line or '" 4' in line]
    assert any(
        '"GET /v1/model HTTP/1.1" 200' in line and line.endswith(" request_id=client-7f3c2a1e") for line in lines
    )
    rid = made.headers["x-request-id"]
    assert any(
        '"GET /v1/predictions/nope HTTP/1.1" 404' in line and line.endswith(f" request_id={rid}") for line in lines
    )
    assert given.status_code == 200 and forged.headers["x-request-id"] != 'a" 200 x'
    assert f"request_id={forged.headers['x-request-id']}" in out and 'a" 200 x' not in out
