"""The Open Inference Protocol over gRPC, driven by the stock clients (tritonclient.grpc and its generated stub)."""

import asyncio
import io
import re
import socket
import subprocess
import sys
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
import tritonclient.http as th
from PIL import Image
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.serving.conftest import ROOT, Server, free_port, png

MODEL = "warn-cluttered-digits"
DIGIT = (ROOT / "docs" / "digit.png").read_bytes()


def start(model_path, **env) -> tuple[Server, int]:
    port = free_port()
    settings = {"WARN_MODEL_PATH": str(model_path), "WARN_GRPC_PORT": str(port), **env}
    server = Server(settings)
    server.wait_ready()
    return server, port


@pytest.fixture(scope="module")
def served(model_path):
    server, port = start(
        model_path,
        WARN_MAX_BODY_BYTES=str(2 * 1024 * 1024),
        WARN_MAX_IMAGES_PER_REQUEST="8",
        WARN_MAX_IMAGE_PIXELS="1000000",
        WARN_MAX_REQUEST_PIXELS="2500000",
    )
    try:
        yield server, port
    finally:
        server.stop()


@pytest.fixture(scope="module")
def grpc_client(served):
    client = tc.InferenceServerClient(f"127.0.0.1:{served[1]}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def http_client(served):
    return th.InferenceServerClient(served[0].url.removeprefix("http://"))


def fp32_input(module, x: np.ndarray):
    t = module.InferInput("image", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    return t


def bytes_input(module, images: list[bytes]):
    t = module.InferInput("image", [len(images)], "BYTES")
    t.set_data_from_numpy(np.array(images, dtype=object))
    return t


def status(e: InferenceServerException) -> grpc.StatusCode:
    return grpc.StatusCode[e.status().removeprefix("StatusCode.")]  # tritonclient gives "StatusCode.NAME"


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(InferenceServerException) as e:
        call()
    return status(e.value)


def test_health_and_metadata(grpc_client, http_client):
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    assert grpc_client.is_model_ready(MODEL) and grpc_client.is_model_ready(MODEL, "1")
    server = grpc_client.get_server_metadata()
    assert server.name == "warn-serve" and "binary_tensor_data" in server.extensions
    meta = grpc_client.get_model_metadata(MODEL, as_json=True)
    over_http = http_client.get_model_metadata(MODEL)
    assert meta["name"] == over_http["name"] and meta["versions"] == over_http["versions"]
    assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [
        (t["name"], t["datatype"]) for t in over_http["outputs"]
    ]
    assert [int(d) for d in meta["inputs"][0]["shape"]] == over_http["inputs"][0]["shape"]


def test_fp32_matches_http(grpc_client, http_client):
    x = np.random.default_rng(0).random((3, 3, 48, 48), dtype=np.float32)
    over_grpc = grpc_client.infer(MODEL, [fp32_input(tc, x)])
    over_http = http_client.infer(MODEL, [fp32_input(th, x)])
    names = [o.name for o in over_grpc.get_response().outputs]
    assert set(names) == {o["name"] for o in over_http.get_response()["outputs"]} and "attention_combined" in names
    for name in names:
        np.testing.assert_allclose(over_grpc.as_numpy(name), over_http.as_numpy(name), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(over_grpc.as_numpy("probabilities").sum(1), 1, rtol=1e-5)


def test_bytes_images_and_output_selection(grpc_client, http_client, served):
    photo = Image.new("RGB", (90, 60), (30, 140, 200))
    images = [DIGIT, png(photo)]
    wanted = [tc.InferRequestedOutput("global_gates"), tc.InferRequestedOutput("probabilities")]
    result = grpc_client.infer(MODEL, [bytes_input(tc, images)], outputs=wanted, request_id="abc")
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["global_gates", "probabilities"] and response.id == "abc"
    probs = result.as_numpy("probabilities")
    # decoded and letterboxed as over HTTP
    over_http = http_client.infer(MODEL, [bytes_input(th, images)]).as_numpy("probabilities")
    np.testing.assert_allclose(probs, over_http, rtol=1e-6, atol=1e-6)
    rest = httpx.post(f"{served[0].url}/v1/predict", content=DIGIT, headers={"content-type": "image/png"}).json()
    assert probs.shape == (2, 11) and int(probs[0].argmax()) == rest["top_k"][0]["index"] == 5


def test_typed_contents_match_raw(served, grpc_client):
    """Clients other than tritonclient send typed contents (fp32_contents, bytes_contents), not raw bytes."""
    x = np.random.default_rng(1).random((1, 3, 48, 48), dtype=np.float32)
    with grpc.insecure_channel(f"127.0.0.1:{served[1]}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="image", datatype="FP32", shape=x.shape).contents.fp32_contents.extend(x.ravel())
        request.outputs.add(name="probabilities")
        reply = stub.ModelInfer(request)
        typed = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(1, 11)
        request = pb.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(DIGIT)
        request.outputs.add(name="probabilities")
        digit = np.frombuffer(stub.ModelInfer(request).raw_output_contents[0], np.float32)
    raw = grpc_client.infer(MODEL, [fp32_input(tc, x)]).as_numpy("probabilities")
    np.testing.assert_allclose(typed, raw, rtol=1e-6, atol=1e-6)
    assert digit.shape == (11,) and abs(digit.sum() - 1) < 1e-5


def test_bad_requests_get_their_status_codes_and_the_server_stays_up(grpc_client, served):
    x = np.zeros((1, 3, 32, 32), np.float32)
    assert code_of(lambda: grpc_client.infer(MODEL, [fp32_input(tc, x)])) == grpc.StatusCode.INVALID_ARGUMENT
    ints = tc.InferInput("image", [1, 3, 48, 48], "INT32")
    ints.set_data_from_numpy(np.zeros((1, 3, 48, 48), np.int32))
    assert code_of(lambda: grpc_client.infer(MODEL, [ints])) == grpc.StatusCode.INVALID_ARGUMENT
    good = fp32_input(tc, np.zeros((1, 3, 48, 48), np.float32))
    assert code_of(lambda: grpc_client.infer("nope", [good])) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: grpc_client.infer(MODEL, [good], model_version="7")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: grpc_client.get_model_metadata("nope")) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(InferenceServerException) as long_name:  # a name is echoed back, bounded
        grpc_client.infer("é" * 100_000, [good])
    assert status(long_name.value) == grpc.StatusCode.NOT_FOUND and len(long_name.value.message()) < 300
    unknown = [tc.InferRequestedOutput("logits_of_nothing")]
    assert code_of(lambda: grpc_client.infer(MODEL, [good], outputs=unknown)) == grpc.StatusCode.INVALID_ARGUMENT
    not_an_image = bytes_input(tc, [b"GIF89a but not really"])
    assert code_of(lambda: grpc_client.infer(MODEL, [not_an_image])) == grpc.StatusCode.INVALID_ARGUMENT
    nan = fp32_input(tc, np.full((1, 3, 48, 48), np.nan, np.float32))
    assert code_of(lambda: grpc_client.infer(MODEL, [nan])) == grpc.StatusCode.INVALID_ARGUMENT
    # the same limits as HTTP: the body size (2 MiB here) and the images per request (8 here)
    big = fp32_input(tc, np.zeros((60, 3, 48, 48), np.float32))  # 1.6 MB, but 60 images
    assert code_of(lambda: grpc_client.infer(MODEL, [big])) == grpc.StatusCode.RESOURCE_EXHAUSTED
    huge = bytes_input(tc, [b"\0" * (3 * 1024 * 1024)])
    assert code_of(lambda: grpc_client.infer(MODEL, [huge])) == grpc.StatusCode.RESOURCE_EXHAUSTED
    many = bytes_input(tc, [DIGIT] * 9)
    assert code_of(lambda: grpc_client.infer(MODEL, [many])) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # and the pixels per request (2.5 M here): three 1-megapixel PNGs
    megapixel = io.BytesIO()
    Image.new("RGB", (1000, 1000), (30, 140, 200)).save(megapixel, "PNG")
    three = bytes_input(tc, [megapixel.getvalue()] * 3)
    assert code_of(lambda: grpc_client.infer(MODEL, [three])) == grpc.StatusCode.RESOURCE_EXHAUSTED
    wide = io.BytesIO()
    Image.new("L", (1, 1)).save(wide, "PNG")
    assert grpc_client.infer(MODEL, [bytes_input(tc, [wide.getvalue()])]).as_numpy("probabilities").shape == (1, 11)
    assert grpc_client.is_server_live() and served[0].proc.poll() is None
    assert httpx.get(f"{served[0].url}/v2/health/ready").status_code == 200
    metrics = httpx.get(f"{served[0].url}/metrics").text
    assert 'warn_grpc_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"}' in metrics
    assert 'warn_grpc_requests_total{code="NOT_FOUND",method="ModelInfer"}' in metrics


def test_api_key_is_required_except_for_health(model_path):
    server, port = start(model_path, WARN_API_KEY="s3cret", WARN_PREVIOUS_API_KEYS='["old"]')
    try:
        client = tc.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_live() and client.is_server_ready()
        good = fp32_input(tc, np.zeros((1, 3, 48, 48), np.float32))
        assert code_of(lambda: client.infer(MODEL, [good])) == grpc.StatusCode.UNAUTHENTICATED
        wrong = {"authorization": "Bearer nope"}
        assert code_of(lambda: client.infer(MODEL, [good], headers=wrong)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: client.get_model_metadata(MODEL)) == grpc.StatusCode.UNAUTHENTICATED
        for key in ("s3cret", "old"):  # the current key, and one still accepted during a rotation
            right = {"authorization": f"Bearer {key}"}
            assert client.infer(MODEL, [good], headers=right).as_numpy("probabilities").shape == (1, 11)
        client.close()
    finally:
        server.stop()


def test_full_queue_answers_unavailable_and_the_rest_are_served(model_path):
    server, port = start(model_path, WARN_QUEUE_SIZE="1", WARN_MAX_BATCH_SIZE="1")
    photo = Image.effect_noise((1200, 900), 60).convert("RGB")
    image = png(photo)

    async def burst() -> list[object]:
        client = tc_aio.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            calls = [client.infer(MODEL, [bytes_input(tc_aio, [image])]) for _ in range(12)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await client.close()

    try:
        results = asyncio.run(burst())
        refused = [r for r in results if isinstance(r, InferenceServerException)]
        served = [r for r in results if not isinstance(r, BaseException)]
        assert refused and served, results
        assert {status(r) for r in refused} == {grpc.StatusCode.UNAVAILABLE}
        assert all(r.as_numpy("probabilities").shape == (1, 11) for r in served)
    finally:
        server.stop()


def test_port_taken_is_a_clear_start_up_error(model_path):
    port = free_port()
    first, _ = start(model_path, WARN_GRPC_PORT=str(port))
    second = Server({"WARN_MODEL_PATH": str(model_path), "WARN_GRPC_PORT": str(port)})
    try:
        assert second.proc.wait(60) != 0
        assert f"cannot listen for gRPC on 127.0.0.1:{port}" in second.output()
    finally:
        second.stop()
        first.stop()


def test_readme_example_runs_as_written(served):
    """The README's tritonclient.grpc example, pointed at this server's port, prints what the README says."""
    readme = (ROOT / "README.md").read_text().split("### Open Inference Protocol over gRPC", 1)[1]
    code = readme.split("```python", 1)[1].split("```", 1)[0]
    expected = [line.removeprefix("# ") for line in code.splitlines() if line.startswith("# ")]
    code = code.replace("127.0.0.1:8001", f"127.0.0.1:{served[1]}")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == expected


def test_a_connection_that_never_speaks_grpc_is_closed(model_path):
    """As on the HTTP port (WARN_HEADER_TIMEOUT_S): silent connections held their socket for good."""
    server, port = start(model_path, WARN_HEADER_TIMEOUT_S="1")
    try:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.settimeout(10)
            started = time.monotonic()
            while conn.recv(4096):  # the server's SETTINGS frame, then the close
                pass
            assert time.monotonic() - started < 5
        client = tc.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_live()
        client.close()
    finally:
        server.stop()


def test_calls_whose_message_never_comes_give_their_slots_back(model_path):
    """grpc counts a call against the concurrency limit (WARN_MAX_CONNECTIONS) from its first frame, and read a
    unary call's message with no time bound: four calls that never sent one held all four slots, health
    included, for as long as their client liked. Now the message must come within WARN_BODY_READ_TIMEOUT_S."""
    server, port = start(model_path, WARN_MAX_CONNECTIONS="4", WARN_BODY_READ_TIMEOUT_S="3")

    async def main() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            infer = channel.stream_unary("/inference.GRPCInferenceService/ModelInfer")  # sends raw bytes
            never = asyncio.Event()

            async def no_message():
                await never.wait()
                yield b""

            async def none_at_all():
                return
                yield

            stuck = [asyncio.ensure_future(infer(no_message())) for _ in range(4)]
            live = channel.unary_unary(
                "/inference.GRPCInferenceService/ServerLive",
                request_serializer=pb.ServerLiveRequest.SerializeToString,
                response_deserializer=pb.ServerLiveResponse.FromString,
            )
            await asyncio.sleep(0.3)
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await live(pb.ServerLiveRequest(), timeout=5)
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # every slot held
            for call in stuck:
                with pytest.raises(grpc.aio.AioRpcError) as late:
                    await asyncio.wait_for(call, 5)
                assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert (await live(pb.ServerLiveRequest(), timeout=5)).live
            with pytest.raises(grpc.aio.AioRpcError) as empty:
                await infer(none_at_all(), timeout=5)
            assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_every_call_carries_a_request_id_in_its_trailers(served):
    """As X-Request-ID over HTTP: the client's own where it is plain, else one the service made, on
    answers and refusals alike."""
    with grpc.insecure_channel(f"127.0.0.1:{served[1]}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def trailer(call) -> str:
            return dict(call.trailing_metadata())["x-request-id"]

        _, kept = stub.ServerLive.with_call(pb.ServerLiveRequest(), metadata=(("x-request-id", "client-9"),))
        _, made = stub.ServerLive.with_call(pb.ServerLiveRequest())
        _, forged = stub.ServerLive.with_call(pb.ServerLiveRequest(), metadata=(("x-request-id", "a b"),))
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), metadata=(("x-request-id", "client-10"),))
    assert trailer(kept) == "client-9"
    assert re.fullmatch("[0-9a-f]{32}", trailer(made)) and re.fullmatch("[0-9a-f]{32}", trailer(forged))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND and trailer(refused.value) == "client-10"


def test_an_internal_error_names_its_request_id_in_the_status_and_the_log(model_path, caplog):
    import logging

    from fastapi.testclient import TestClient

    from service.config import Settings
    from service.main import create_app

    port = free_port()
    app = create_app(Settings(MODEL_PATH=model_path, STORE="memory", GRPC_PORT=port))
    with TestClient(app), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        app.state.runtime.batcher._run = lambda x: 1 / 0
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="image", datatype="FP32", shape=[1, 3, 48, 48])
        request.raw_input_contents.append(np.zeros((1, 3, 48, 48), np.float32).tobytes())
        with caplog.at_level(logging.ERROR, logger="service.grpc"), pytest.raises(grpc.RpcError) as failed:
            stub.ModelInfer(request, metadata=(("x-request-id", "client-11"),))
    assert failed.value.code() == grpc.StatusCode.INTERNAL and "client-11" in failed.value.details()
    assert dict(failed.value.trailing_metadata())["x-request-id"] == "client-11"
    logged = [r for r in caplog.records if "client-11" in r.getMessage()]
    assert logged and logged[0].exc_info and logged[0].exc_info[0] is ZeroDivisionError


def test_a_refused_call_leaves_no_garbage_holding_its_request(model_path):
    """A refusal raised grpc's AbortError while the service's error was handled; their frames formed
    reference cycles that held the request until a full garbage collection. A worker refusing 15 MiB
    messages one after another grew by 30 MB a call."""
    import gc

    from fastapi.testclient import TestClient

    from service.config import Settings
    from service.main import create_app

    port = free_port()
    app = create_app(Settings(MODEL_PATH=model_path, STORE="memory", GRPC_PORT=port, MAX_IMAGES_PER_REQUEST=2))
    refusals = {
        "not an image": ([b"GIF89a but not really"], MODEL),
        "too many images": ([DIGIT] * 3, MODEL),
        "no such model": ([DIGIT], "nope"),
    }
    with TestClient(app), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for images, model in refusals.values():
                request = pb.ModelInferRequest(model_name=model)
                request.inputs.add(name="image", datatype="BYTES", shape=[len(images)])
                request.raw_input_contents.append(b"".join(len(i).to_bytes(4, "little") + i for i in images))
                with pytest.raises(grpc.RpcError) as refused:
                    stub.ModelInfer(request)
                assert refused.value.code() != grpc.StatusCode.INTERNAL and refused.value.details()
            gc.collect()
            held = [o for o in gc.garbage if isinstance(o, pb.ModelInferRequest)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert held == []


def test_messages_count_in_the_bodies_a_worker_holds(model_path):
    """grpc reads a call's message whole before the service sees it; from then until its answer it counts
    in the same per-worker budget as HTTP bodies, and a call past it is refused (UNAVAILABLE, retryable)."""
    from fastapi.testclient import TestClient

    from service.config import Settings
    from service.main import create_app

    port = free_port()
    mib = 1024 * 1024
    settings = Settings(
        MODEL_PATH=model_path, STORE="memory", GRPC_PORT=port, MAX_BODY_BYTES=mib, MAX_BODY_BYTES_IN_FLIGHT=mib
    )
    app = create_app(settings)
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(len(DIGIT).to_bytes(4, "little") + DIGIT)  # 540 KB: two do not fit
    with TestClient(app), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        batcher = app.state.runtime.batcher
        run, running = batcher._run, threading.Event()

        def slow(x):
            running.set()
            time.sleep(1.5)
            return run(x)

        batcher._run = slow
        first = stub.ModelInfer.future(request)
        assert running.wait(10)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request)
        assert first.result().outputs
        batcher._run = run
        assert stub.ModelInfer(request).outputs  # what the first held was given back
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "holds" in refused.value.details() and f"{mib:,}" in refused.value.details()
    assert app.state.body_budget.held == 0


def test_a_hung_model_times_the_call_out_and_the_server_reads_unready_until_it_ends(model_path):
    from fastapi.testclient import TestClient

    from service.config import Settings
    from service.main import create_app

    port = free_port()
    app = create_app(Settings(MODEL_PATH=model_path, STORE="memory", GRPC_PORT=port, MODEL_TIMEOUT_S=0.5))
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image", datatype="FP32", shape=[1, 3, 48, 48])
    request.raw_input_contents.append(np.zeros((1, 3, 48, 48), np.float32).tobytes())
    with TestClient(app), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        batcher = app.state.runtime.batcher
        run, gate = batcher._run, threading.Event()
        batcher._run = lambda x: (gate.wait(10), run(x))[1]
        try:
            with pytest.raises(grpc.RpcError) as timed_out:
                stub.ModelInfer(request)
            ready_while_hung = stub.ServerReady(pb.ServerReadyRequest()).ready
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(request)
        finally:
            gate.set()
        while batcher.stalled():
            time.sleep(0.01)
        ready_after = stub.ServerReady(pb.ServerReadyRequest()).ready
        assert stub.ModelInfer(request).outputs
    assert timed_out.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "0.5 s" in timed_out.value.details()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not ready_while_hung and ready_after
