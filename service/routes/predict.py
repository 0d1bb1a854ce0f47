"""POST /v1/predict and POST /v1/attention: an image in, a prediction or an overlay out."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from service.deps import IMAGE_BODY, ImageBytes, OverlayDep, RuntimeDep
from service.overlay import FORMATS
from service.response import describe
from service.schemas import Prediction, errors
from service.store import new_key

router = APIRouter(prefix="/v1", tags=["predict"])

PREDICT_EXAMPLE = {
    "id": "019ac1d2e3f47a5b9c6d7e8f9a0b1c2d",
    "model": {"name": "warn-cluttered-digits", "version": "1"},
    "top_k": [{"label": "3", "index": 3, "probability": 0.981}],
    "global_gates": {"attention_0": 0.21, "attention_1": 0.33, "attention_2": 0.31, "backbone": 0.15},
    "layers": [
        {
            "name": "attention_0",
            "index": 0,
            "stride": 1,
            "global_gate": 0.21,
            "gates": [0.4, 0.2, 0.2, 0.2],
            "top_class": {"label": "3", "index": 3, "probability": 0.93},
        }
    ],
    "image": {"width": 640, "height": 400},
    "attention_urls": {"combined": "http://localhost:8000/v1/predictions/019ac1d2.../attention/combined.png"},
    "timings_ms": {"decode_ms": 1.9, "inference_ms": 6.2, "total_ms": 8.8},
}


NOT_STORED = (
    "no overlay URLs: the prediction store failed or did not answer in time (WARN_STORE_TIMEOUT_S), so this "
    "prediction was not kept; POST /v1/attention draws an overlay in one call"
)


def url_base(request: Request) -> str:
    public = request.app.state.settings.PUBLIC_URL
    if public:
        return public.rstrip("/")
    scope = request.scope
    server = scope.get("server")
    root = scope.get("app_root_path", scope.get("root_path", ""))  # as Starlette's base_url reads it
    return _base(scope["scheme"], request.headers.get("host"), server and tuple(server), root)


@functools.lru_cache(maxsize=64)
def _base(scheme: str, host: str | None, server: tuple[str, int | None] | None, root_path: str) -> str:
    """Starlette's `request.base_url`, built once per (scheme, Host, server, root path) and not per request."""
    headers = [] if host is None else [(b"host", host.encode("latin-1"))]
    scope = {
        "type": "http",
        "scheme": scheme,
        "server": server,
        "root_path": root_path,
        "path": "/",
        "headers": headers,
    }
    return str(Request(scope).base_url).rstrip("/")


@router.post(
    "/predict",
    openapi_extra=IMAGE_BODY,
    summary="Classify an image",
    response_model=Prediction,
    responses={
        200: {"content": {"application/json": {"example": PREDICT_EXAMPLE}}},
        **errors(400, 401, 413, 415, 422, 500, 503, 504),
    },
)
async def predict(
    request: Request,
    rt: RuntimeDep,
    data: ImageBytes,
    top_k: Annotated[int | None, Query(ge=1, description="how many classes to return")] = None,
    probabilities: Annotated[bool, Query(description="include the full probability vector")] = False,
) -> JSONResponse:
    """Top-k classes, gates of every attended layer, global gates, and URLs of the attention overlays."""
    started = time.perf_counter()
    upload = rt.kept_upload(data)
    # at the model's scale where the upload is kept (it is decoded again for an overlay), else at the overlay's
    c = await rt.classify(data, 0 if upload is not None else rt.settings.STORE_IMAGE_MAX_SIZE)
    g = c.geometry
    key = new_key()
    base = f"{url_base(request)}/v1/predictions/{key}/attention"
    signer = request.app.state.signer
    query = f"?{signer.query(key)}" if signer else ""
    layers = ["combined", *map(str, range(rt.info.attended_layers))]
    result = {
        "id": key,
        **describe(rt.info, c.outputs, (g.width, g.height), top_k or rt.settings.TOP_K, probabilities),
        "attention_urls": {name: f"{base}/{name}.png{query}" for name in layers},
    }
    if not await rt.remember(key, c, result, upload):
        result["attention_urls"] = None
        result["warnings"] = [NOT_STORED]
    c.timings_ms["total_ms"] = (time.perf_counter() - started) * 1e3
    result["timings_ms"] = {k: round(v, 3) for k, v in c.timings_ms.items()}
    return JSONResponse(result)  # already plain JSON types: no encoder pass


@router.post(
    "/attention",
    openapi_extra=IMAGE_BODY,
    summary="Attention overlay of an image, in one call",
    response_class=Response,
    responses={
        200: {"content": {media: {} for media in FORMATS.values()}, "description": "the overlay"},
        **errors(400, 401, 413, 415, 422, 500, 503, 504),
    },
)
async def attention(
    rt: RuntimeDep,
    data: ImageBytes,
    params: OverlayDep,
    layer: Annotated[str, Query(description="attended layer index, or 'combined'")] = "combined",
) -> Response:
    """The overlay is drawn at most WARN_STORE_IMAGE_MAX_SIZE on its longest side, as stored ones are."""
    side = min(params.max_size or rt.settings.STORE_IMAGE_MAX_SIZE, rt.settings.STORE_IMAGE_MAX_SIZE)
    c = await rt.classify(data, side)
    p = dataclasses.replace(params, layer=layer, format=params.format or "png")

    return Response(await rt.in_decoder(rt.render, rt.snapshot(c, {}), c.image, p), media_type=FORMATS[p.format])
