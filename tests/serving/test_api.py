"""The REST API through httpx against the app."""

import io
import re
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.config import Settings
from service.main import create_app
from tests.serving.conftest import make_client, png


@pytest.fixture(scope="module")
def photo() -> bytes:
    rng = np.random.default_rng(0)
    return png(Image.fromarray(rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)))


def test_predict_raw_body(client, photo):
    r = client.post("/v1/predict?top_k=3&probabilities=true", content=photo, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    info = client.get("/v1/model").json()
    assert body["model"] == {"name": info["name"], "version": info["version"]}
    assert len(body["top_k"]) == 3
    probs = [t["probability"] for t in body["top_k"]]
    assert probs == sorted(probs, reverse=True)
    assert sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert body["top_k"][0]["label"] == max(body["probabilities"], key=body["probabilities"].get)
    assert list(body["global_gates"]) == info["layer_names"]
    assert sum(body["global_gates"].values()) == pytest.approx(1, abs=1e-4)
    attended = [layer for layer in body["layers"] if layer["name"] != "backbone"]
    assert len(attended) == len(info["attended_layers"])
    # the default model's measured Pointing Game, per layer, as warn-eval recorded it before export
    pg = [layer["pointing_game"] for layer in info["attended_layers"]]
    assert pg == info["pointing_game"]["layers"] and min(pg) > 0.7 and max(pg) > 0.95
    assert info["pointing_game"]["combined"] > 0.95 and info["pointing_game"]["tolerance_px"] == 2
    for layer in attended:
        assert sum(layer["gates"]) == pytest.approx(1, abs=1e-4)
        assert layer["top_class"]["label"] in info["classes"]
    assert body["image"] == {"width": 200, "height": 120}
    assert set(body["attention_urls"]) == {"combined", *map(str, range(len(attended)))}
    assert body["timings_ms"]["total_ms"] >= body["timings_ms"]["inference_ms"] > 0


def test_predict_multipart_matches_raw(client, photo):
    raw = client.post("/v1/predict", content=photo, headers={"content-type": "image/png"}).json()
    multi = client.post("/v1/predict", files={"file": ("x.png", photo, "image/png")}).json()
    assert multi["top_k"] == raw["top_k"]
    assert multi["id"] != raw["id"]


def test_stored_prediction_and_overlays(client, photo):
    body = client.post("/v1/predict", content=photo, headers={"content-type": "image/png"}).json()
    stored = client.get(f"/v1/predictions/{body['id']}").json()
    assert stored["top_k"] == body["top_k"]
    pngs = {}
    for name, url in body["attention_urls"].items():
        r = client.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(r.content))
        assert img.format == "PNG" and img.size == (200, 120)
        pngs[name] = np.asarray(img)
    arrays = list(pngs.values())
    assert all(not np.array_equal(arrays[0], a) for a in arrays[1:]), "overlays of different layers must differ"


def test_overlay_parameters(client, photo):
    body = client.post("/v1/predict", content=photo, headers={"content-type": "image/png"}).json()
    url = body["attention_urls"]["0"]
    small = Image.open(io.BytesIO(client.get(url, params={"max_size": 50}).content))
    assert small.size == (50, 30)
    heads = [np.asarray(Image.open(io.BytesIO(client.get(url, params={"head": h}).content))) for h in (0, 1)]
    assert not np.array_equal(*heads)

    def rgb(params):
        return np.asarray(Image.open(io.BytesIO(client.get(url, params=params).content)).convert("RGB"))

    bare, over = rgb({"mode": "heatmap"}), rgb({"alpha": 0.3})
    assert bare.shape == over.shape and not np.array_equal(bare, over)
    turbo = rgb({"colormap": "turbo", "mode": "heatmap"})
    assert turbo.shape == bare.shape and not np.array_equal(turbo, bare)
    assert client.get(url, params={"colormap": "rainbow"}).status_code == 422
    assert client.get(url, params={"head": 99}).status_code == 400
    combined = body["attention_urls"]["combined"]
    r = client.get(combined, params={"head": 0})
    assert r.status_code == 400 and "combined" in r.json()["error"]
    bad_layer = client.get(url.replace("/0.png", "/7.png"))
    assert bad_layer.status_code == 400 and "layer" in bad_layer.json()["error"]


def test_attention_in_one_call(client, photo):
    r = client.post("/v1/attention?layer=combined&max_size=100", content=photo, headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (100, 60)
    r = client.post("/v1/attention?layer=1&mode=heatmap", files={"file": ("x.png", photo, "image/png")})
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (200, 120)


def test_unknown_and_expired_predictions(model_path, photo):
    assert_unknown = lambda c, key: c.get(f"/v1/predictions/{key}").status_code == 404  # noqa: E731
    with make_client(model_path, STORE_TTL_S=0.5, STORE_MAX_ITEMS=2, STORE_WRITE_WAIT_S=0.05) as c:
        assert assert_unknown(c, "nope")
        r = c.get("/v1/predictions/nope/attention/combined.png")
        assert r.status_code == 404 and r.json()["code"] == "not_found"
        ids = [
            c.post("/v1/predict", content=photo, headers={"content-type": "image/png"}).json()["id"] for _ in range(3)
        ]
        assert c.get(f"/v1/predictions/{ids[2]}").status_code == 200
        assert assert_unknown(c, ids[0])  # evicted: only 2 are kept
        time.sleep(0.6)
        assert assert_unknown(c, ids[2])  # expired


def test_model_endpoint_shows_the_provider(client):
    info = client.get("/v1/model").json()
    assert info["providers"][0] == "CPUExecutionProvider"
    assert info["metadata"]["weights_sha256"] and info["input_size"]["height"] > 0


def stage_counts(client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {
        s: float(re.search(rf'warn_stage_duration_seconds_count{{stage="{s}"}} (\S+)', text)[1])
        for s in ("decode", "model")
    }


def test_metrics(client, photo):
    client.post("/v1/predict", content=photo, headers={"content-type": "image/png"})
    before = stage_counts(client)
    client.post("/v1/predict", content=b"", headers={"content-type": "image/png"})
    text = client.get("/metrics").text
    assert 'warn_http_requests_total{method="POST",route="/v1/predict",status="200"}' in text
    assert 'route="/v1/predict",status="422"' in text
    assert "warn_http_request_duration_seconds_bucket" in text
    assert "warn_batch_size_count" in text and "warn_inference_duration_seconds_count" in text
    assert "warn_queue_depth" in text
    client.post("/v1/predict", content=photo, headers={"content-type": "image/png"})
    client.post("/v1/predict", content=b"", headers={"content-type": "image/png"})
    assert stage_counts(client) == {s: n + 1 for s, n in before.items()}  # the empty body reached neither stage


def test_api_key(model_path, photo):
    with make_client(model_path, API_KEY="s3cret") as c:
        r = c.post("/v1/predict", content=photo, headers={"content-type": "image/png"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/model", headers={"authorization": "Bearer wrong"}).status_code == 401
        ok = c.post(
            "/v1/predict", content=photo, headers={"content-type": "image/png", "authorization": "Bearer s3cret"}
        )
        assert ok.status_code == 200
        assert c.get("/v2/health/ready").status_code == 200 and c.get("/metrics").status_code == 200
        assert c.get("/v2").status_code == 401


def test_cors(model_path):
    with make_client(model_path, CORS_ORIGINS=["https://dash.example"]) as c:
        r = c.options(
            "/v1/predict", headers={"origin": "https://dash.example", "access-control-request-method": "POST"}
        )
        assert r.headers["access-control-allow-origin"] == "https://dash.example"
        r = c.get("/v2/health/live", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_openapi_docs(client):
    spec = client.get("/openapi.json").json()
    assert "/v1/predict" in spec["paths"] and "/v2/models/{name}/infer" in spec["paths"]
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        html = client.get(page).text
        # served here, not from a CDN: the page works offline
        assert f'src="/docs-assets/{asset}"' in html and "cdn." not in html and "fonts.googleapis" not in html
        script = client.get(f"/docs-assets/{asset}")
        assert script.status_code == 200 and len(script.content) > 100_000


def test_docs_are_open_by_choice_or_behind_the_key(model_path):
    with make_client(model_path, API_KEY="s3cret") as c:  # the default: documentation stays public
        assert c.get("/openapi.json").status_code == 200 and c.get("/docs").status_code == 200
    with make_client(model_path, API_KEY="s3cret", PUBLIC_DOCS=False) as c:
        for path in ("/openapi.json", "/docs"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        key = {"authorization": "Bearer s3cret"}
        assert "/v1/predict" in c.get("/openapi.json", headers=key).json()["paths"]
        assert c.get("/docs", headers=key).status_code == 200
        assert c.get("/redoc").status_code == 401 and c.get("/redoc", headers=key).status_code == 200


def test_every_route_documents_its_errors_and_shapes(client):
    spec = client.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if path in ("/metrics", "/v2/health/live", "/v2/health/ready"):
                continue
            codes = set(op["responses"])
            assert {"401", "500"} <= codes, f"{method} {path} documents only {codes}"
            for code, r in op["responses"].items():
                if code.startswith(("4", "5")):
                    schema = r["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, code)
    predict = spec["paths"]["/v1/predict"]["post"]["responses"]
    assert predict["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Prediction"}
    assert {"413", "415", "503"} <= set(predict)


def test_documented_error_examples_have_the_real_shape(client):
    """/docs shows each error as the service sends it: {"error", "code"} (+ "detail" on validation)."""
    spec = client.get("/openapi.json").json()
    examples = {}
    for ops in spec["paths"].values():
        for op in ops.values():
            for status, response in op["responses"].items():
                body = response.get("content", {}).get("application/json", {})
                if body.get("schema") == {"$ref": "#/components/schemas/ErrorBody"}:  # not readiness's {"ready": false}
                    example = body["example"]
                    assert {"error", "code"} <= set(example) <= {"error", "code", "detail"}
                    examples[int(status)] = example
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # FastAPI's own {"detail": [...]}
    real = {
        422: client.post("/v1/predict?top_k=0", content=b"x", headers={"content-type": "image/png"}),
        415: client.post("/v1/predict", content=b"not an image", headers={"content-type": "image/png"}),
        404: client.get("/v1/predictions/abc"),
        400: client.post("/v2/models/warn-cluttered-digits/infer", json={"inputs": "nope"}),
    }
    for status, answer in real.items():
        assert answer.status_code == status
        assert set(answer.json()) == set(examples[status]), status
        assert answer.json()["code"] == examples[status]["code"]
    assert real[422].json()["error"] == examples[422]["error"] and real[422].json()["detail"][0]["loc"] == [
        "query",
        "top_k",
    ]


def test_only_real_work_takes_a_thread_hop(model_path, photo, monkeypatch):
    """FastAPI runs a plain `def` endpoint or dependency in its thread pool, a hop there and back per
    request; only decoding (the upload, and a stored upload for its overlay) and rendering should leave the
    loop, for the decoding threads (the memory store takes none)."""
    import functools

    import anyio.to_thread

    from service.pipeline import Runtime

    hops = []
    run_sync, in_decoder = anyio.to_thread.run_sync, Runtime.in_decoder

    def name(func) -> str:
        return (func.func if isinstance(func, functools.partial) else func).__qualname__

    async def spy(func, *args, **kwargs):
        hops.append(name(func))
        return await run_sync(func, *args, **kwargs)

    async def spy_decoder(self, func, *args):
        hops.append("decoder: " + name(func))
        return await in_decoder(self, func, *args)

    monkeypatch.setattr(anyio.to_thread, "run_sync", spy)
    monkeypatch.setattr(Runtime, "in_decoder", spy_decoder)
    client = make_client(model_path, API_KEY="k", STORE="memory")
    with client:
        auth = {"Authorization": "Bearer k"}
        r = client.post("/v1/predict", content=photo, headers={"content-type": "image/jpeg", **auth})
        assert r.status_code == 200
        assert client.get(r.json()["attention_urls"]["combined"], headers=auth).status_code == 200
        assert client.get("/v1/model", headers=auth).status_code == 200
    # Rendering shares the decoding threads: in anyio's 40, 40 overlays of a 4000x3000 JPEG drawn at once took
    # a worker from 133 to 428 MB; in WARN_DECODE_THREADS, 333 MB.
    decoding = {"decoder: Runtime._prepare_and_run_alone", "decoder: Runtime.picture", "decoder: Runtime.render"}
    assert hops[0] == "decoder: Runtime._prepare_and_run_alone" and "decoder: Runtime.render" in hops, hops
    assert set(hops) <= decoding, hops


def test_decoding_work_of_a_cancelled_request_never_runs(model_path):
    """Requests past the decoding threads wait in their pool's queue; one cancelled there is dropped, and its
    image is never decoded."""
    import asyncio
    import threading

    with make_client(model_path, STORE="memory", DECODE_THREADS=1) as c:
        rt = c.app.state.runtime
        gate, ran = threading.Event(), []

        async def scenario() -> None:
            busy = asyncio.ensure_future(rt.in_decoder(gate.wait, 30))
            queued = asyncio.ensure_future(rt.in_decoder(ran.append, "queued"))
            await asyncio.sleep(0.05)
            queued.cancel()
            while not queued.done():  # the cancel reaches the pool's queue before its thread is freed
                await asyncio.sleep(0)
            gate.set()
            assert await busy is True
            with pytest.raises(asyncio.CancelledError):
                await queued
            assert await rt.in_decoder(ran.append, "after") is None  # the thread is free again

        c.portal.call(scenario)
    assert ran == ["after"]


def test_overlay_urls_follow_the_request_or_the_public_url(model_path, photo):
    """The base of the overlay URLs is built once per Host, scheme and root path, never shared between them."""
    jpeg = {"content-type": "image/jpeg"}
    with make_client(model_path, STORE="memory") as c:
        for host in ("a.example:8080", "b.example"):
            urls = c.post("/v1/predict", content=photo, headers={**jpeg, "host": host}).json()["attention_urls"]
            assert urls["combined"].startswith(f"http://{host}/v1/predictions/"), urls
    with TestClient(create_app(Settings(MODEL_PATH=model_path, STORE="memory")), root_path="/warn") as c:
        urls = c.post("/v1/predict", content=photo, headers=jpeg).json()["attention_urls"]
        assert urls["0"].startswith("http://testserver/warn/v1/predictions/") and urls["0"].endswith("/attention/0.png")
    with make_client(model_path, STORE="memory", PUBLIC_URL="https://warn.example/api/") as c:
        urls = c.post("/v1/predict", content=photo, headers=jpeg).json()["attention_urls"]
        assert urls["combined"].startswith("https://warn.example/api/v1/predictions/"), urls


@pytest.mark.parametrize("host", [None, "", "ü.example:8080", "a" * 8000, "evil.example/x?y#z", "[::1]:80"])
def test_the_cached_url_base_is_starlettes_for_any_host(host):
    """Hostile or odd Host headers give the base Starlette would have built, cache or no cache."""
    from types import SimpleNamespace

    from starlette.requests import Request

    from service.routes.predict import url_base

    headers = [] if host is None else [(b"host", host.encode("latin-1", "replace"))]
    for root in ({"root_path": "/warn"}, {"root_path": "/api/warn", "app_root_path": "/api"}):
        app = SimpleNamespace(state=SimpleNamespace(settings=Settings(PUBLIC_URL=None)))
        scope = {
            "type": "http",
            "scheme": "https",
            "server": ("10.0.0.1", 443),
            "path": "/v1/predict",
            "query_string": b"",
            "headers": headers,
            "app": app,
            **root,
        }
        for _ in range(2):  # built, then from the cache
            assert url_base(Request(scope)) == str(Request(scope).base_url).rstrip("/")


def test_a_lone_request_runs_in_its_decoding_thread_and_concurrent_ones_are_batched(model_path, photo):
    """One request at a time runs where it was decoded; requests that overlap share the batcher's runs."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    with make_client(model_path, STORE="memory") as c:
        batcher = c.app.state.runtime.batcher
        runs: list[tuple[str, int]] = []
        run = batcher._run

        def spy(x):
            runs.append((threading.current_thread().name, len(x)))
            time.sleep(0.05)  # long enough for the requests below to overlap
            return run(x)

        batcher._run = spy
        headers = {"content-type": "image/jpeg"}
        for _ in range(3):
            assert c.post("/v1/predict", content=photo, headers=headers).status_code == 200
        alone = list(runs)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: c.post("/v1/predict", content=photo, headers=headers), range(8)))
    assert [a.status_code for a in answers] == [200] * 8
    assert len(alone) == 3 and not any(name.startswith("inference") for name, _ in alone), alone
    together = runs[3:]
    assert sum(n for _, n in together) == 8 and max(n for _, n in together) > 1, together


def test_predict_keeps_the_upload_and_decodes_it_once_for_its_overlays(model_path, monkeypatch):
    """/v1/predict decodes a JPEG at the model's scale (libjpeg's 1/8 here, which still leaves twice the
    input's side) and stores the upload as sent; its overlays decode that once, at the overlay's scale, for every
    layer."""
    from service import pipeline

    y, x = np.mgrid[0:600, 0:900]
    buf = io.BytesIO()
    Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    sizes, pictures = [], []
    decode, picture = pipeline.decode, pipeline.Runtime.picture

    def spy_decode(*args, **kwargs):
        d = decode(*args, **kwargs)
        sizes.append(d.image.size)
        return d

    def spy_picture(self, upload):
        pictures.append(upload)
        return picture(self, upload)

    monkeypatch.setattr(pipeline, "decode", spy_decode)
    monkeypatch.setattr(pipeline.Runtime, "picture", spy_picture)
    with make_client(model_path, STORE="memory") as client:
        body = client.post("/v1/predict", content=jpeg, headers={"content-type": "image/jpeg"}).json()
        assert body["image"] == {"width": 900, "height": 600}
        stored = client.portal.call(client.app.state.runtime.store.get, body["id"])
        assert stored.encoded == jpeg
        for url in body["attention_urls"].values():
            r = client.get(url)
            assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (900, 600)
    assert sizes == [(113, 75), (900, 600)]
    assert pictures == [jpeg]


def jpeg_of(width: int, height: int) -> bytes:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize(
    "why, upload, ctype",
    [
        ("not a JPEG: decoded in full either way", "photo", "image/png"),
        ("a JPEG larger than an overlay's pixels", "jpeg", "image/jpeg"),
    ],
)
def test_other_uploads_are_stored_decoded(model_path, photo, why, upload, ctype):
    """Only a JPEG no larger than an overlay-sized image's pixels is kept as uploaded. Any other upload is
    decoded at the overlay's scale, as /v1/attention does, and its pixels are kept: no second decode for
    its overlays, and no entry larger than those pixels."""
    data = photo if upload == "photo" else jpeg_of(200, 120)
    with make_client(model_path, STORE="memory", STORE_IMAGE_MAX_SIZE=64) as client:
        assert len(data) > 3 * 64 * 64, why
        body = client.post("/v1/predict", content=data, headers={"content-type": ctype}).json()
        stored = client.portal.call(client.app.state.runtime.store.get, body["id"])
        assert stored.encoded is None and max(stored.picture().size) <= 64, why
        r = client.get(body["attention_urls"]["combined"])
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == stored.picture().size == (50, 30)


def test_readiness_follows_a_shared_session_that_is_down(model_path, monkeypatch):
    """While the launcher replaces a dead session process, every readiness probe says not ready (503 over
    HTTP: clients such as tritonclient read the status, not the body)."""
    import asyncio

    from tritonclient.grpc import service_pb2 as pb

    from service.grpc_v2 import Servicer

    with make_client(model_path) as c:
        rt = c.app.state.runtime
        servicer = Servicer(rt, rt.settings, rt.metrics, c.app.state.body_budget)

        class Context:  # what the servicer reads of a call's context
            def invocation_metadata(self) -> tuple:
                return ()

            def set_trailing_metadata(self, metadata: tuple) -> None:
                pass

        def grpc_ready() -> tuple[bool, bool]:
            server = asyncio.run(servicer.ServerReady(pb.ServerReadyRequest(), Context())).ready
            model = asyncio.run(servicer.ModelReady(pb.ModelReadyRequest(name=rt.info.name), Context())).ready
            return server, model

        assert c.get("/v2/health/ready").status_code == 200 and grpc_ready() == (True, True)
        monkeypatch.setattr(rt.model, "serving", lambda: False)
        r = c.get("/v2/health/ready")
        assert r.status_code == 503 and r.json() == {"ready": False}
        r = c.get(f"/v2/models/{rt.info.name}/ready")
        assert r.status_code == 503 and r.json()["code"] == "model_unavailable" and r.headers["retry-after"] == "1"
        assert grpc_ready() == (False, False)
