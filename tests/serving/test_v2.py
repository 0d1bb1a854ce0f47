"""The Open Inference Protocol: the stock tritonclient against a real uvicorn process, plus raw requests."""

import base64
import gzip
import json
import struct

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from bench.protocols import http_body
from service.config import Settings
from service.preprocess import to_input
from tests.serving.conftest import encode, make_client, png


@pytest.fixture(scope="module")
def meta(server):
    return httpx.get(f"{server.url}/v2/models/{model_name(server)}").json()


def model_name(server) -> str:
    return httpx.get(f"{server.url}/v1/model").json()["name"]


@pytest.fixture(scope="module")
def reference(model_path):
    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 48, 48), dtype=np.float32)


def test_tritonclient_health_and_metadata(server):
    c = triton.InferenceServerClient(server.url.removeprefix("http://"))
    name = model_name(server)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(name)
    assert not c.is_model_ready("no-such-model")
    assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
    md = c.get_model_metadata(name)
    assert md["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 48, 48]}]
    assert md["outputs"][0]["name"] == "probabilities"
    with pytest.raises(InferenceServerException, match="unknown model"):
        c.get_model_metadata("no-such-model")


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer_matches_onnxruntime(server, reference, binary):
    c = triton.InferenceServerClient(server.url.removeprefix("http://"))
    x = pixels(3)
    inp = triton.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [
        triton.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "attention_0", "global_gates")
    ]
    result = c.infer(model_name(server), [inp], outputs=outs, request_id="r1")
    want = dict(zip([o.name for o in reference.get_outputs()], reference.run(None, {"image": x})))
    for name in ("probabilities", "attention_0", "global_gates"):
        np.testing.assert_allclose(result.as_numpy(name), want[name], atol=1e-5)
    assert result.get_response()["id"] == "r1"


def test_tritonclient_all_outputs_and_compression(server, reference):
    c = triton.InferenceServerClient(server.url.removeprefix("http://"))
    x = pixels(2, seed=5)
    inp = triton.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = c.infer(model_name(server), [inp], request_compression_algorithm="gzip")
    names = [o.name for o in reference.get_outputs()]
    want = dict(zip(names, reference.run(None, {"image": x})))
    for name in names:
        np.testing.assert_allclose(result.as_numpy(name), want[name], atol=1e-5)


def test_bytes_input_holds_encoded_images(server):
    """As OpenVINO Model Server does: clients send encoded images and need not preprocess."""
    c = triton.InferenceServerClient(server.url.removeprefix("http://"))
    images = [png(Image.new("RGB", (64, 40), (200, 30, 30))), png(Image.new("RGB", (20, 20), (10, 10, 250)))]
    inp = triton.InferInput("image", [2], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=np.object_))
    result = c.infer(model_name(server), [inp], outputs=[triton.InferRequestedOutput("probabilities")])
    got = result.as_numpy("probabilities")
    rest = [
        httpx.post(
            f"{server.url}/v1/predict?probabilities=true", content=im, headers={"content-type": "image/png"}
        ).json()["probabilities"]
        for im in images
    ]
    for row, probs in zip(got, rest):
        np.testing.assert_allclose(row, list(probs.values()), atol=1e-5)


def test_json_request_with_base64_bytes_and_plain_json(server):
    name = model_name(server)
    image = png(Image.new("RGB", (30, 30), (0, 120, 0)))
    body = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}]
    }
    r = httpx.post(f"{server.url}/v2/models/{name}/infer", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["probabilities"]["shape"] == [1, 11] and len(out["probabilities"]["data"]) == 11

    x, _ = to_input(Image.open(__import__("io").BytesIO(image)).convert("RGB"), (48, 48))
    body = {
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 48, 48], "data": x.ravel().tolist()}],
        "outputs": [{"name": "probabilities"}],
    }
    r = httpx.post(f"{server.url}/v2/models/{name}/versions/1/infer", json=body)
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["outputs"][0]["data"], out["probabilities"]["data"], atol=1e-5)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (json.dumps({"inputs": []}).encode(), "non-empty 'inputs'"),
        (
            json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}).encode(),
            "one input named 'image'",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.0] * 192}]}
            ).encode(),
            "must be FP32 of shape",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 48, 48], "data": [0.0] * 5}]}
            ).encode(),
            "do not fill shape",
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "image",
                            "datatype": "FP32",
                            "shape": [1, 3, 48, 48],
                            "parameters": {"binary_data_size": 999999},
                        }
                    ]
                }
            ).encode(),
            "past the end",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["!!notbase64!!"]}]}
            ).encode(),
            "base64",
        ),
        (
            json.dumps(
                {
                    "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 48, 48], "data": [0.0] * 6912}],
                    "outputs": [{"name": "nope"}],
                }
            ).encode(),
            "unknown output",
        ),
    ],
)
def test_bad_infer_requests_get_clear_errors(server, body, fragment):
    r = httpx.post(
        f"{server.url}/v2/models/{model_name(server)}/infer", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]


def test_bad_encoded_image_in_bytes_input(server):
    payload = b"garbage!"
    blob = struct.pack("<I", len(payload)) + payload
    header = json.dumps(
        {
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(blob)}}
            ]
        }
    ).encode()
    r = httpx.post(
        f"{server.url}/v2/models/{model_name(server)}/infer",
        content=header + blob,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 415 and "supported format" in r.json()["error"]


def test_unknown_model_and_version(server):
    assert httpx.post(f"{server.url}/v2/models/other/infer", json={}).status_code == 404
    assert httpx.get(f"{server.url}/v2/models/{model_name(server)}/versions/9").status_code == 404


def test_gzip_bomb_is_refused(server):
    bomb = gzip.compress(b"\x00" * (40 * 1024 * 1024))
    r = httpx.post(
        f"{server.url}/v2/models/{model_name(server)}/infer", content=bomb, headers={"content-encoding": "gzip"}
    )
    assert r.status_code == 413


MALFORMED = [
    ("empty BYTES batch", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [0], "data": []}]}, 400),
    (
        "shape past any limit",
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": [4611686018427387904, 4], "data": []}]},
        413,
    ),
    ("UINT8 out of range", {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "data": [300]}]}, 400),
    (
        "outputs not a list",
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [0]}], "outputs": 5},
        400,
    ),
    (
        "parameters not an object",
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [0]}], "parameters": "x"},
        400,
    ),
    (
        "binary_data_size not a number",
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": "abc"}}]},
        400,
    ),
    ("shape of strings", {"inputs": [{"name": "image", "datatype": "FP32", "shape": ["1"], "data": [0]}]}, 400),
    ("input not an object", {"inputs": [7]}, 400),
    ("ragged BYTES", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [["a"], "b"]}]}, 400),
]


@pytest.mark.parametrize("body,status", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_requests_are_json_errors(server, body, status):
    r = httpx.post(f"{server.url}/v2/models/{model_name(server)}/infer", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and r.json()["error"]


def test_deep_json_and_odd_header_length_are_400(server):
    url = f"{server.url}/v2/models/{model_name(server)}/infer"
    deep = httpx.post(url, content=b"[" * 100000 + b"]" * 100000, headers={"content-type": "application/json"})
    assert deep.status_code == 400 and deep.json()["code"] == "invalid_request"
    odd = httpx.post(
        url,
        content=b"{}",
        headers=[(b"content-type", b"application/octet-stream"), (b"inference-header-content-length", b"\xb2")],
    )
    assert odd.status_code == 400 and odd.json()["code"] == "invalid_request"
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_images_per_request_are_capped(server):
    """8,000 copies of a 1x1 PNG in 2 KB of gzip once took the server to 13 GB; now a 413 before decoding."""
    one = base64.b64encode(png(Image.new("RGB", (1, 1)))).decode()
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [8000], "data": [one] * 8000}]}
    packed = gzip.compress(json.dumps(body).encode())
    assert len(packed) < 10_000
    url = f"{server.url}/v2/models/{model_name(server)}/infer"
    r = httpx.post(url, content=packed, headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 413 and "limit of 64" in r.json()["error"]
    rows = pixels(65)
    r = httpx.post(
        url,
        content=json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [65, 3, 48, 48]}]}).encode()
        + rows.tobytes(),
        headers={"inference-header-content-length": str(len(b"x")), "content-type": "application/octet-stream"},
    )
    assert r.status_code in (400, 413)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": [65, 3, 48, 48],
                    "parameters": {"binary_data_size": rows.nbytes},
                }
            ]
        }
    ).encode()
    r = httpx.post(
        url,
        content=header + rows.tobytes(),
        headers={"inference-header-content-length": str(len(header)), "content-type": "application/octet-stream"},
    )
    assert r.status_code == 413 and r.json()["code"] == "body_too_large"


def test_pixels_per_request_are_capped_before_any_image_is_decoded(model_path):
    """A 126 KB PNG can hold 40 megapixels, 0.37 s of a core to decode, and a v2 request 64 of them: so a
    request's images may decode to MAX_REQUEST_PIXELS in all, counted from their headers."""
    square = Image.new("RGB", (1000, 1000), (30, 140, 200))
    pngs, jpegs = [png(square)] * 3, [encode(square, "JPEG")] * 3

    def infer(c, images: list[bytes]):
        spec = {"name": "image", "datatype": "BYTES", "shape": [len(images)]}
        body = {"inputs": [{**spec, "data": [base64.b64encode(b).decode() for b in images]}]}
        return c.post(f"/v2/models/{c.get('/v1/model').json()['name']}/infer", json=body)

    with make_client(model_path, STORE="memory", MAX_IMAGE_PIXELS=1_000_000, MAX_REQUEST_PIXELS=2_500_000) as c:
        rt = c.app.state.runtime
        prepared = []
        original = rt.prepare
        rt.prepare = lambda data, side=0: (prepared.append(len(data)), original(data, side))[1]
        refused = infer(c, pngs)
        assert refused.status_code == 413 and refused.json()["code"] == "image_too_large", refused.text
        assert "3,000,000 pixels" in refused.json()["error"] and "2,500,000" in refused.json()["error"]
        assert prepared == []  # refused from the headers alone
        assert infer(c, pngs[:2]).status_code == 200  # 2 megapixels
        assert infer(c, jpegs).status_code == 200  # a JPEG counts at the scale it decodes at (1/8 here)
        assert len(prepared) == 5
        progressive = [encode(square, "JPEG", progressive=True)] * 3  # each scan decoded over the whole image
        assert infer(c, progressive).status_code == 413 and len(prepared) == 5
        assert infer(c, [pngs[0], b"not an image", pngs[0]]).json()["code"] == "unsupported_media_type"
    with make_client(model_path, STORE="memory", MAX_IMAGE_PIXELS=1_000_000) as c:  # default: twice an image's
        assert infer(c, pngs).status_code == 413 and infer(c, pngs[:2]).status_code == 200


def test_a_request_pixel_limit_below_one_image_is_refused_at_start():
    with pytest.raises(ValueError, match="MAX_REQUEST_PIXELS is below MAX_IMAGE_PIXELS"):
        Settings(MAX_IMAGE_PIXELS=1_000_000, MAX_REQUEST_PIXELS=999_999)
    assert Settings(MAX_IMAGE_PIXELS=1_000_000).request_pixels() == 2_000_000


def test_json_with_more_values_than_the_tensors_may_hold_is_refused_unparsed(server):
    """Python holds each JSON value as an object: 16 MB of numbers parsed to 147 MB in 0.23 s of a core."""
    url = f"{server.url}/v2/models/{model_name(server)}/infer"
    image = {"name": "image", "datatype": "FP32", "shape": [8, 3, 48, 48], "data": pixels(8).ravel().tolist()}
    assert httpx.post(url, json={"inputs": [image]}, timeout=30).status_code == 200  # 55,296 values
    padded = {"inputs": [{**image, "shape": [1, 3, 48, 48], "data": [0.5] * 6912}], "padding": [1] * 500_000}
    r = httpx.post(url, json=padded, timeout=30)
    assert r.status_code == 413 and r.json()["code"] == "body_too_large" and "values" in r.json()["error"], r.text[:300]
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_a_decompressed_body_counts_in_the_bodies_a_worker_holds(model_path):
    """A few KB of gzip may inflate to WARN_MAX_BODY_BYTES, which counting the body as it arrived did not see."""
    image = {"name": "image", "datatype": "FP32", "shape": [1, 3, 48, 48], "data": pixels(1).ravel().tolist()}
    text = json.dumps({"inputs": [image]}).encode()
    packed = gzip.compress(text + b" " * (4_190_000 - len(text)))  # JSON allows the trailing spaces
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    for budget, status in ((4_194_304, 503), (8_388_608, 200)):
        with make_client(model_path, STORE="memory", MAX_BODY_BYTES=4_194_304, MAX_BODY_BYTES_IN_FLIGHT=budget) as c:
            r = c.post(f"/v2/models/{c.get('/v1/model').json()['name']}/infer", content=packed, headers=headers)
            assert r.status_code == status, r.text[:300]
            assert c.app.state.body_budget.held == 0  # given back, answered or refused
    assert r.json()["outputs"][0]["shape"] == [1, 11]


def test_non_finite_pixels_are_422(server):
    x = pixels(1)
    x[0, 0, 0, 0] = np.nan
    inp = {"name": "image", "datatype": "FP32", "shape": list(x.shape), "parameters": {"binary_data_size": x.nbytes}}
    header = json.dumps({"inputs": [inp]}).encode()
    r = httpx.post(
        f"{server.url}/v2/models/{model_name(server)}/infer",
        content=header + x.tobytes(),
        headers={"inference-header-content-length": str(len(header)), "content-type": "application/octet-stream"},
    )
    assert r.status_code == 422 and "NaN" in r.json()["error"]


def test_an_unexpected_error_is_a_json_500(model_path):
    from fastapi.testclient import TestClient

    from service.config import Settings
    from service.main import create_app

    # as a real server does: the exception is logged, not raised into the client
    with TestClient(create_app(Settings(MODEL_PATH=model_path)), raise_server_exceptions=False) as c:
        c.app.state.runtime.batcher._run = lambda x: 1 / 0
        r = c.post("/v1/predict", content=png(Image.new("RGB", (8, 8))), headers={"content-type": "image/png"})
    rid = r.headers["x-request-id"]
    assert r.status_code == 500 and r.json() == {
        "error": f"internal server error (logged under request id {rid}); please report it with that id",
        "code": "internal_error",
        "request_id": rid,
    }


def test_small_binary_requests_are_handled_on_the_event_loop_and_the_rest_in_threads(model_path, monkeypatch):
    """tritonclient's binary form (a small JSON header, raw tensors) is parsed and answered on the event loop,
    as the gRPC port's small calls are; JSON tensors, compressed bodies and large JSON answers go to a
    thread, so that one of them never holds the loop."""
    import asyncio

    from service.routes import v2
    from tests.serving.conftest import make_client

    where: list[tuple[str, str]] = []

    def recording(name, fn):
        def wrapped(*args):
            try:
                asyncio.get_running_loop()
                where.append((name, "loop"))
            except RuntimeError:
                where.append((name, "thread"))
            return fn(*args)

        return wrapped

    monkeypatch.setattr(v2, "parse_request", recording("parse", v2.parse_request))
    monkeypatch.setattr(v2, "encode_response", recording("encode", v2.encode_response))
    x = pixels(1)
    body, header_length = http_body(x, "probabilities")  # as tritonclient sends it
    binary = {"content-type": "application/octet-stream", "inference-header-content-length": str(header_length)}
    as_json = json.dumps(
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 48, 48], "data": x.ravel().tolist()}]}
    ).encode()
    with make_client(model_path) as c:
        url = f"/v2/models/{c.get('/v1/model').json()['name']}/infer"
        answers = [
            c.post(url, content=body, headers=binary),
            c.post(url, content=gzip.compress(body), headers={**binary, "content-encoding": "gzip"}),
            c.post(url, content=as_json, headers={"content-type": "application/json"}),  # every output, as JSON
        ]
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text[:200] for r in answers]
    assert answers[0].content == answers[1].content
    assert where == [
        ("parse", "loop"),
        ("encode", "loop"),
        ("parse", "thread"),  # decompression
        ("encode", "loop"),
        ("parse", "thread"),  # 6,912 numbers as JSON text
        ("encode", "thread"),  # every output, attention maps included, as JSON numbers
    ]


def test_binary_bytes_tensors_are_read_no_further_than_their_shape(server):
    """16 MB of empty BYTES elements was 4 million turns of a Python loop before any count was checked."""
    url = f"{server.url}/v2/models/{model_name(server)}/infer"

    def send(shape: list[int], data: bytes) -> httpx.Response:
        spec = {"name": "image", "datatype": "BYTES", "shape": shape, "parameters": {"binary_data_size": len(data)}}
        header = json.dumps({"inputs": [spec]}).encode()
        headers = {"inference-header-content-length": str(len(header)), "content-type": "application/octet-stream"}
        return httpx.post(url, content=header + data, headers=headers, timeout=30)

    empties = struct.pack("<I", 0) * 500_000  # 2 MB
    one = png(Image.new("RGB", (8, 8)))
    element = struct.pack("<I", len(one)) + one
    more = send([1], element + empties)
    assert more.status_code == 400 and "more than the 1 elements" in more.json()["error"]
    too_many = send([65], empties)
    assert too_many.status_code == 413 and "limit of 64" in too_many.json()["error"]
    assert send([1], element).status_code == 200


def test_json_bytes_elements_are_counted_before_any_is_decoded(monkeypatch):
    from service import tensors

    decoded = []
    monkeypatch.setattr(tensors, "_json_bytes", lambda v: decoded.append(v) or b"")
    one = base64.b64encode(png(Image.new("RGB", (8, 8)))).decode()
    header = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [one] + [""] * 200_000}]}
    with pytest.raises(tensors.InvalidRequest, match="200001 elements do not fill shape"):
        tensors.read_inputs(header, memoryview(b""), 64 * 3 * 48 * 48, 64)
    assert decoded == []


def test_no_more_bodies_inflate_at_once_than_images_decode(model_path, monkeypatch):
    """A gzip body of 17 KB inflates to WARN_MAX_BODY_BYTES before its size is known and counted. In anyio's 40
    threads, 40 such bodies at once took one worker from 119 to 771 MB; in the decoding threads, to 169 MB."""
    import threading
    import time

    from service.routes import v2
    from tests.serving.conftest import make_client

    inflating, most, lock = 0, 0, threading.Lock()
    parse = v2.parse_request

    def slow_parse(*args):
        nonlocal inflating, most
        with lock:
            inflating += 1
            most = max(most, inflating)
        try:
            time.sleep(0.2)
            return parse(*args)
        finally:
            with lock:
                inflating -= 1

    monkeypatch.setattr(v2, "parse_request", slow_parse)
    body, header_length = http_body(pixels(1), "probabilities")
    headers = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(header_length),
        "content-encoding": "gzip",
    }
    answers = []
    with make_client(model_path, DECODE_THREADS=2) as c:
        url = f"/v2/models/{c.get('/v1/model').json()['name']}/infer"
        calls = [
            threading.Thread(target=lambda: answers.append(c.post(url, content=gzip.compress(body), headers=headers)))
            for _ in range(6)
        ]
        for t in calls:
            t.start()
        for t in calls:
            t.join(30)
    assert sorted(r.status_code for r in answers) == [200] * 6
    assert most == 2
