"""The Open Inference Protocol's model semantics, shared by its HTTP routes and its gRPC server."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from service import __version__
from service.errors import BodyTooLarge, ImageTooLarge, InvalidRequest, NotFound
from service.pipeline import Runtime
from service.tensors import Tensor, finite

SERVER_NAME = "warn-serve"
EXTENSIONS = ["binary_tensor_data"]
# Requests this small (with nothing to decompress) are read and answered on the event loop, on either port:
# a thread hop costs more than the work.
INLINE_BYTES = 64 * 1024


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


def check_model(rt: Runtime, name: str, version: str | None = None) -> None:
    if name != rt.info.name or (version is not None and version != rt.info.version):
        wanted = f"{name[:64]!r}" + (f" version {version[:64]!r}" if version else "")  # echoed back: bounded
        raise NotFound(f"unknown model {wanted}: this server has {rt.info.name!r} version {rt.info.version!r}")


def input_limits(rt: Runtime) -> tuple[int, int]:
    """The most elements a request's input may hold: the FP32 values of WARN_MAX_IMAGES_PER_REQUEST images,
    or that many BYTES elements (each an encoded image)."""
    h, w = rt.info.input_size
    cap = rt.settings.MAX_IMAGES_PER_REQUEST
    return cap * 3 * h * w, cap


def model_metadata(rt: Runtime) -> dict[str, Any]:
    info = rt.info
    return {
        "name": info.name,
        "versions": [info.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in info.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in info.outputs],
    }


async def check_pixels(rt: Runtime, images: np.ndarray) -> None:
    """Refuses a request whose images would decode to more than WARN_MAX_REQUEST_PIXELS in all, from their
    headers: a 126 KB PNG can hold 40 megapixels (0.37 s of a core to decode), and a request 64 of them."""
    limit = rt.settings.request_pixels()
    if len(images) * rt.settings.MAX_IMAGE_PIXELS <= limit:  # within the limit whatever the images hold
        return
    pixels = await rt.in_decoder(rt.pixels_to_prepare, images)
    if pixels > limit:
        raise ImageTooLarge(
            f"the {len(images)} images of this request would decode to {pixels:,} pixels, more than the limit of "
            f"{limit:,} for one request: send them in several requests"
        )


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
        await check_pixels(rt, images)
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
