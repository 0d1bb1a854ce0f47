"""Stored predictions and their overlays, fetchable by URL (e.g. from a dashboard's <img> tags)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Response

from service.deps import OverlayDep, RuntimeDep
from service.errors import InvalidRequest, NotFound
from service.overlay import FORMATS
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


@router.get(
    "/{prediction_id}", summary="A stored prediction", response_model=Prediction, responses=errors(401, 404, 422, 500)
)
async def get_prediction(rt: RuntimeDep, prediction_id: str) -> dict[str, Any]:
    """The answer /v1/predict gave, without its timings."""
    return {**(await lookup(rt, prediction_id)).result, "id": prediction_id}


EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpeg", "jpg": "jpeg"}


@router.get(
    "/{prediction_id}/attention/{layer}.{ext}",
    summary="Attention overlay of a stored prediction",
    response_class=Response,
    responses={
        200: {"content": {media: {} for media in FORMATS.values()}, "description": "the overlay"},
        **errors(400, 401, 404, 422, 500),
    },
)
async def get_overlay(rt: RuntimeDep, prediction_id: str, layer: str, ext: str, params: OverlayDep) -> Response:
    """`layer` is an attended layer index (0 = shallowest) or `combined` (layers mixed by the global gates).

    The extension (png, webp, jpeg) picks the format unless `format` is given.
    """
    if ext not in EXTENSIONS:
        raise InvalidRequest(f"overlay extension must be one of {', '.join(EXTENSIONS)}, got {ext[:10]!r}")
    stored = await lookup(rt, prediction_id)
    fmt = params.format or EXTENSIONS[ext]
    p = dataclasses.replace(params, layer=layer, format=fmt)
    image = await rt.overlay(prediction_id, stored, p)
    return Response(image, media_type=FORMATS[fmt], headers={"Cache-Control": "private, max-age=300"})
