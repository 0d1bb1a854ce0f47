"""Stored predictions and their overlays, fetchable by URL (e.g. from a dashboard's <img> tags)."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from fastapi import APIRouter, Request, Response

from service import __version__
from service.deps import OverlayDep, RuntimeDep
from service.errors import InvalidRequest, NotFound
from service.overlay import FORMATS, layer_grid
from service.schemas import Prediction, errors
from service.store import StoredPrediction

router = APIRouter(prefix="/v1/predictions", tags=["predictions"])


async def lookup(rt: RuntimeDep, prediction_id: str) -> StoredPrediction:
    stored = await rt.find(prediction_id)
    if stored is None:
        raise NotFound(
            f"no prediction {prediction_id!r}: unknown, or expired (predictions are kept {rt.settings.STORE_TTL_S:g} s)"
        )
    return stored


EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpeg", "jpg": "jpeg"}
CACHE_CONTROL = "private, max-age=300"


def entity_tag(prediction_id: str, *settings: object) -> str:
    """A weak ETag: a stored prediction never changes, so its id, this version and, for an overlay,
    everything that draws the picture (the parameters, the encoder's settings) name what is sent,
    without drawing or reading it."""
    digest = hashlib.blake2b(repr((prediction_id, *settings, __version__)).encode(), digest_size=12).hexdigest()
    return f'W/"{digest}"'


def matches(if_none_match: str | None, tag: str) -> bool:
    """If-None-Match's weak comparison (RFC 9110, 13.1.2): any listed tag, or *, equal but for W/. A list
    longer than any client keeps for one URL is ignored (the answer is sent) rather than split on the loop."""
    if not if_none_match or len(if_none_match) > 4096:
        return False
    listed = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in listed or tag.removeprefix("W/") in listed


@router.get(
    "/{prediction_id}",
    summary="A stored prediction",
    response_model=Prediction,
    responses={304: {"description": "the copy the client holds (If-None-Match: its ETag) is current"}}
    | errors(401, 404, 422, 500, 503),
)
async def get_prediction(request: Request, response: Response, rt: RuntimeDep, prediction_id: str) -> Any:
    """The answer /v1/predict gave, without its timings."""
    stored = await lookup(rt, prediction_id)
    headers = {"Cache-Control": CACHE_CONTROL, "ETag": entity_tag(prediction_id)}
    if matches(request.headers.get("if-none-match"), headers["ETag"]):
        return Response(status_code=304, headers=headers)
    response.headers.update(headers)
    return {**stored.result, "id": prediction_id}


@router.get(
    "/{prediction_id}/attention/{layer}.{ext}",
    summary="Attention overlay of a stored prediction",
    response_class=Response,
    responses={
        200: {"content": {media: {} for media in FORMATS.values()}, "description": "the overlay"},
        304: {"description": "the copy the client holds (If-None-Match: its ETag) is the overlay still"},
        **errors(400, 401, 404, 422, 500, 503),
    },
)
async def get_overlay(
    request: Request, rt: RuntimeDep, prediction_id: str, layer: str, ext: str, params: OverlayDep
) -> Response:
    """`layer` is an attended layer index (0 = shallowest) or `combined` (layers mixed by the global gates).

    The extension (png, webp, jpeg) picks the format unless `format` is given. A browser or dashboard that
    revalidates its copy (If-None-Match with the ETag it was given) gets 304, and nothing is drawn.
    """
    if ext not in EXTENSIONS:
        raise InvalidRequest(f"overlay extension must be one of {', '.join(EXTENSIONS)}, got {ext[:10]!r}")
    stored = await lookup(rt, prediction_id)
    fmt = params.format or EXTENSIONS[ext]
    p = dataclasses.replace(params, layer=layer, format=fmt)
    headers = {"Cache-Control": CACHE_CONTROL, "ETag": entity_tag(prediction_id, p, rt.encoding)}
    if matches(request.headers.get("if-none-match"), headers["ETag"]):
        layer_grid(stored, p.layer, p.head)  # what a render would refuse (a layer or head out of range) is refused
        return Response(status_code=304, headers=headers)
    image = await rt.overlay(prediction_id, stored, p)
    return Response(image, media_type=FORMATS[fmt], headers=headers)
