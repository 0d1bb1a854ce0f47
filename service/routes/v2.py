"""The Open Inference Protocol (KServe v2 REST), as Triton, KServe and OpenVINO Model Server speak it."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service import __version__
from service.deps import RuntimeDep
from service.errors import InvalidRequest, NotFound
from service.predictor import Runtime
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

INFER_EXAMPLE = {
    "id": "42",
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 48, 48], "data": [0.0, "..."]}],
    "outputs": [{"name": "probabilities"}],
}


def check_model(rt: Runtime, name: str, version: str | None = None) -> None:
    if name != rt.info.name or (version is not None and version != rt.info.version):
        wanted = f"{name!r}" + (f" version {version!r}" if version else "")
        raise NotFound(f"unknown model {wanted}: this server has {rt.info.name!r} version {rt.info.version!r}")


@router.get("", summary="Server metadata")
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


@router.get("/models/{name}", summary="Model metadata")
@router.get("/models/{name}/versions/{version}", include_in_schema=False)
async def get_model_metadata(rt: RuntimeDep, name: str, version: str | None = None) -> dict[str, Any]:
    check_model(rt, name, version)
    return model_metadata(rt)


@router.get("/models/{name}/ready", summary="Model readiness")
@router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
async def model_ready(rt: RuntimeDep, name: str, version: str | None = None) -> dict[str, Any]:
    check_model(rt, name, version)
    return {"name": name, "ready": True}


async def to_model_input(rt: Runtime, tensors: list[Tensor]) -> np.ndarray:
    """The model's input batch from the request's one input: FP32 pixels, or BYTES holding encoded images."""
    spec = rt.info.inputs[0]
    if len(tensors) != 1 or tensors[0].name != spec.name:
        raise InvalidRequest(f"this model takes one input named {spec.name!r}, got {[t.name for t in tensors]}")
    t = tensors[0]
    h, w = rt.info.input_size
    if t.datatype == "BYTES":
        if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1):
            raise InvalidRequest(f"BYTES input {t.name!r} must have shape [N] or [N, 1] (one encoded image each)")
        arrays = await asyncio.gather(*(run_in_threadpool(rt.prepare, b) for b in t.data.reshape(-1)))
        return np.stack([x for _, x, _ in arrays])
    if t.datatype != "FP32" or len(t.shape) != 4 or t.shape[1:] != [3, h, w]:
        raise InvalidRequest(
            f"input {t.name!r} must be FP32 of shape [N, 3, {h}, {w}] (RGB in [0, 1]) "
            f"or BYTES of encoded images; got {t.datatype} {t.shape}"
        )
    if t.shape[0] == 0:
        raise InvalidRequest("input batch is empty")
    return np.ascontiguousarray(t.data, dtype=np.float32)


@router.post(
    "/models/{name}/infer",
    summary="Inference",
    openapi_extra={"requestBody": {"content": {"application/json": {"example": INFER_EXAMPLE}}}},
)
@router.post("/models/{name}/versions/{version}/infer", include_in_schema=False)
async def infer(request: Request, rt: RuntimeDep, name: str, version: str | None = None) -> Response:
    check_model(rt, name, version)
    body = decompress(await request.body(), request.headers.get("content-encoding"), rt.settings.MAX_BODY_BYTES)

    header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
    tensors = read_inputs(header, binary)
    wanted = requested_outputs(header, rt.model.output_names)
    x = await to_model_input(rt, tensors)
    outputs = await rt.infer_tensor(x)
    reply: dict[str, Any] = {"model_name": rt.info.name, "model_version": rt.info.version}
    if "id" in header:
        reply["id"] = header["id"]
    content, header_length = encode_response(reply, [(n, outputs[n], b) for n, b in wanted])
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(header_length)}
    )
