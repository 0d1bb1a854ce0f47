"""The Open Inference Protocol (KServe v2 REST), as Triton, KServe and OpenVINO Model Server speak it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service.deps import RuntimeDep
from service.errors import ModelUnavailable
from service.limits import BodyBudget
from service.pipeline import RESTARTING, Runtime
from service.protocol import INLINE_BYTES, check_model, input_limits, model_metadata, server_metadata, to_model_input
from service.schemas import InferResponse, ModelMetadata, ModelReady, ServerMetadata, errors
from service.tensors import (
    HEADER_LENGTH,
    Tensor,
    decompress,
    encode_response,
    read_inputs,
    requested_outputs,
    split_body,
)

router = APIRouter(prefix="/v2", tags=["open inference protocol"])


@dataclass
class Parsed:
    header: dict[str, Any]
    tensors: list[Tensor]
    outputs: list[tuple[str, bool]]  # (name, as binary)
    inflated: int  # bytes of the body decompressed (gzip, deflate), which the tensors refer to; 0 if it was not


INFER_EXAMPLE = {
    "id": "42",
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 48, 48], "data": [0.0, "..."]}],
    "outputs": [{"name": "probabilities"}],
}


@router.get("", summary="Server metadata", response_model=ServerMetadata, responses=errors(401, 500))
async def get_server_metadata() -> dict[str, Any]:
    return server_metadata()


@router.get(
    "/models/{name}", summary="Model metadata", response_model=ModelMetadata, responses=errors(401, 404, 422, 500)
)
@router.get("/models/{name}/versions/{version}", include_in_schema=False)
async def get_model_metadata(rt: RuntimeDep, name: str, version: str | None = None) -> dict[str, Any]:
    check_model(rt, name, version)
    return model_metadata(rt)


@router.get(
    "/models/{name}/ready",
    summary="Model readiness",
    response_model=ModelReady,
    responses={
        **errors(401, 404, 422, 500),
        503: {
            **errors(503)[503],
            "description": "the shared session's process is restarting, or the model's run has gone on past "
            "WARN_MODEL_TIMEOUT_S: retry after Retry-After seconds",
            "content": {"application/json": {"example": {"error": RESTARTING, "code": "model_unavailable"}}},
        },
    },
)
@router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
async def model_ready(rt: RuntimeDep, name: str, version: str | None = None) -> dict[str, Any]:
    check_model(rt, name, version)
    if why := rt.unready():  # a status, not 200 with ready false: clients (tritonclient) read the status
        raise ModelUnavailable(why)
    return {"name": name, "ready": True}


# A request of at most INLINE_BYTES whose JSON is this small and which needs no decompression (the binary
# tensor extension, as tritonclient sends it: a header, then raw tensors) is parsed and answered on the
# event loop, as the gRPC port's small calls are: two thread hops cost more than the work. Anything else,
# whose JSON or decompression may be large, goes to a thread.
INLINE_JSON_BYTES = 4 * 1024
# Values a request's JSON may hold beyond its tensors' data: names, shapes, parameters, requested outputs.
JSON_STRUCTURE_VALUES = 10_000
INLINE_JSON_VALUES = 1024  # output values answered as JSON numbers rather than binary
INLINE_OUTPUT_BYTES = 256 * 1024


def parses_inline(body: bytes, encoding: str | None, header_length: str | None) -> bool:
    if encoding not in (None, "identity") or len(body) > INLINE_BYTES:
        return False
    if header_length is None:
        return len(body) <= INLINE_JSON_BYTES
    return not (header_length.isascii() and header_length.isdigit()) or int(header_length) <= INLINE_JSON_BYTES


def parse_request(rt: Runtime, body: bytes, encoding: str | None, header_length: str | None) -> Parsed:
    """Decompress and parse an inference request (CPU work: off the event loop unless `parses_inline`)."""
    limit = rt.settings.MAX_BODY_BYTES
    max_elements, max_strings = input_limits(rt)
    json_values = max_elements + max_strings + JSON_STRUCTURE_VALUES
    plain = decompress(body, encoding, limit)
    header, binary = split_body(plain, header_length, json_values)
    tensors = read_inputs(header, binary, max_elements, max_strings)
    inflated = 0 if plain is body else len(plain)
    return Parsed(header, tensors, requested_outputs(header, rt.model.output_names), inflated)


@router.post(
    "/models/{name}/infer",
    summary="Inference",
    openapi_extra={"requestBody": {"content": {"application/json": {"example": INFER_EXAMPLE}}}},
    response_model=InferResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "JSON, or JSON then binary outputs"},
        **errors(400, 401, 404, 413, 422, 500, 503, 504),
    },
)
@router.post("/models/{name}/versions/{version}/infer", include_in_schema=False)
async def infer(request: Request, rt: RuntimeDep, name: str, version: str | None = None) -> Response:
    """At most WARN_MAX_IMAGES_PER_REQUEST images (FP32 rows or BYTES elements) per request."""
    check_model(rt, name, version)
    # The body first: a place in the queue is for parsing, decoding and inference, and an upload that trickles in
    # must not hold one (the body's own limits bound it: service/limits.py).
    body = await request.body()
    async with rt.batcher.admit():  # a full queue refuses before the body is parsed
        request_parts = (body, request.headers.get("content-encoding"), request.headers.get(HEADER_LENGTH))
        if parses_inline(*request_parts):
            parsed = parse_request(rt, *request_parts)
        else:  # in a decoding thread: as many bodies inflate at once as images decode, not one per anyio thread (40)
            parsed = await rt.in_decoder(parse_request, rt, *request_parts)
        del body, request_parts
        budget: BodyBudget = request.app.state.body_budget
        budget.take(parsed.inflated)  # a 16 KB gzip body inflates to 16 MiB, which the body's count did not see
        try:
            x = await to_model_input(rt, parsed.tensors)
            outputs = await rt.batcher.submit_admitted(x)
        finally:
            budget.give(parsed.inflated)
    reply: dict[str, Any] = {"model_name": rt.info.name, "model_version": rt.info.version}
    if "id" in parsed.header:
        reply["id"] = str(parsed.header["id"])[:256]
    wanted = [(n, outputs[n], b) for n, b in parsed.outputs]
    as_json = sum(a.size for _, a, binary in wanted if not binary)
    if as_json <= INLINE_JSON_VALUES and sum(a.nbytes for _, a, _ in wanted) <= INLINE_OUTPUT_BYTES:
        content, header_length = encode_response(reply, wanted)
    else:
        content, header_length = await run_in_threadpool(encode_response, reply, wanted)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(header_length)}
    )
