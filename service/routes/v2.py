"""The Open Inference Protocol (KServe v2 REST), as Triton, KServe and OpenVINO Model Server speak it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service import __version__
from service.deps import RuntimeDep
from service.errors import BodyTooLarge, InvalidRequest, NotFound
from service.pipeline import Runtime
from service.schemas import InferResponse, ModelMetadata, ModelReady, ServerMetadata, errors
from service.tensors import (
    HEADER_LENGTH,
    Tensor,
    decompress,
    encode_response,
    finite,
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


INFER_EXAMPLE = {
    "id": "42",
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 48, 48], "data": [0.0, "..."]}],
    "outputs": [{"name": "probabilities"}],
}


def check_model(rt: Runtime, name: str, version: str | None = None) -> None:
    if name != rt.info.name or (version is not None and version != rt.info.version):
        wanted = f"{name!r}" + (f" version {version!r}" if version else "")
        raise NotFound(f"unknown model {wanted}: this server has {rt.info.name!r} version {rt.info.version!r}")


@router.get("", summary="Server metadata", response_model=ServerMetadata, responses=errors(401, 500))
async def server_metadata() -> dict[str, Any]:
    return {"name": "warn-serve", "version": __version__, "extensions": ["binary_tensor_data"]}


def model_metadata(rt: Runtime) -> dict[str, Any]:
    info = rt.info
    return {
        "name": info.name,
        "versions": [info.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in info.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in info.outputs],
    }


@router.get(
    "/models/{name}", summary="Model metadata", response_model=ModelMetadata, responses=errors(401, 404, 422, 500)
)
@router.get("/models/{name}/versions/{version}", include_in_schema=False)
async def get_model_metadata(rt: RuntimeDep, name: str, version: str | None = None) -> dict[str, Any]:
    check_model(rt, name, version)
    return model_metadata(rt)


@router.get(
    "/models/{name}/ready", summary="Model readiness", response_model=ModelReady, responses=errors(401, 404, 422, 500)
)
@router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
async def model_ready(rt: RuntimeDep, name: str, version: str | None = None) -> dict[str, Any]:
    check_model(rt, name, version)
    return {"name": name, "ready": True}


def parse_request(rt: Runtime, body: bytes, encoding: str | None, header_length: str | None) -> Parsed:
    """Decompress and parse an inference request (CPU work, run off the event loop)."""
    limit = rt.settings.MAX_BODY_BYTES
    header, binary = split_body(decompress(body, encoding, limit), header_length)
    h, w = rt.info.input_size
    tensors = read_inputs(header, binary, rt.settings.MAX_IMAGES_PER_REQUEST * 3 * h * w)
    return Parsed(header, tensors, requested_outputs(header, rt.model.output_names))


async def to_model_input(rt: Runtime, tensors: list[Tensor]) -> np.ndarray:
    """The model's input batch from the request's one input: FP32 pixels, or BYTES holding encoded images."""
    spec = rt.info.inputs[0]
    if len(tensors) != 1 or tensors[0].name != spec.name:
        names = [t.name[:64] for t in tensors[:8]]
        raise InvalidRequest(f"this model takes one input named {spec.name!r}, got {names}")
    t = tensors[0]
    h, w = rt.info.input_size
    cap = rt.settings.MAX_IMAGES_PER_REQUEST
    if t.datatype == "BYTES":
        if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1):
            raise InvalidRequest(f"BYTES input {t.name!r} must have shape [N] or [N, 1] (one encoded image each)")
        images = t.data.reshape(-1)
        if len(images) == 0:
            raise InvalidRequest("input batch is empty")
        if len(images) > cap:
            raise BodyTooLarge(f"{len(images)} images in one request, more than the limit of {cap}")
        arrays = await asyncio.gather(*(rt.decode(b) for b in images))
        return np.stack([x for _, x, _ in arrays])
    if t.datatype != "FP32" or len(t.shape) != 4 or t.shape[1:] != [3, h, w]:
        raise InvalidRequest(
            f"input {t.name!r} must be FP32 of shape [N, 3, {h}, {w}] (RGB in [0, 1]) "
            f"or BYTES of encoded images; got {t.datatype} {t.shape}"
        )
    if t.shape[0] == 0:
        raise InvalidRequest("input batch is empty")
    if t.shape[0] > cap:  # read_inputs already bounds the element count; this names the rule
        raise BodyTooLarge(f"{t.shape[0]} images in one request, more than the limit of {cap}")
    return finite(np.ascontiguousarray(t.data, dtype=np.float32))


@router.post(
    "/models/{name}/infer",
    summary="Inference",
    openapi_extra={"requestBody": {"content": {"application/json": {"example": INFER_EXAMPLE}}}},
    response_model=InferResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "JSON, or JSON then binary outputs"},
        **errors(400, 401, 404, 413, 422, 500, 503),
    },
)
@router.post("/models/{name}/versions/{version}/infer", include_in_schema=False)
async def infer(request: Request, rt: RuntimeDep, name: str, version: str | None = None) -> Response:
    """At most WARN_MAX_IMAGES_PER_REQUEST images (FP32 rows or BYTES elements) per request."""
    check_model(rt, name, version)
    with rt.batcher.admit():  # a full queue refuses before the body is even parsed
        body = await request.body()
        headers = request.headers
        parsed = await run_in_threadpool(
            parse_request, rt, body, headers.get("content-encoding"), headers.get(HEADER_LENGTH)
        )
        del body
        x = await to_model_input(rt, parsed.tensors)
        outputs = await rt.batcher.submit_admitted(x)
    reply: dict[str, Any] = {"model_name": rt.info.name, "model_version": rt.info.version}
    if "id" in parsed.header:
        reply["id"] = str(parsed.header["id"])[:256]
    wanted = [(n, outputs[n], b) for n, b in parsed.outputs]
    content, header_length = await run_in_threadpool(encode_response, reply, wanted)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(header_length)}
    )
