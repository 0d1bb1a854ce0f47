"""Stored predictions and their overlays, fetchable by URL (e.g. from a dashboard's <img> tags)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from service.deps import OverlayDep, RuntimeDep
from service.errors import NotFound
from service.store import StoredPrediction

router = APIRouter(prefix="/v1/predictions", tags=["predictions"])


async def lookup(rt: RuntimeDep, prediction_id: str) -> StoredPrediction:
    stored = await rt.store.get(prediction_id)
    if stored is None:
        raise NotFound(
            f"no prediction {prediction_id!r}: unknown, or expired (predictions are kept {rt.settings.STORE_TTL_S:g} s)"
        )
    return stored


@router.get("/{prediction_id}", summary="A stored prediction")
async def get_prediction(rt: RuntimeDep, prediction_id: str) -> dict[str, Any]:
    return {"id": prediction_id, **(await lookup(rt, prediction_id)).result}


@router.get(
    "/{prediction_id}/attention/{layer}.png",
    summary="Attention overlay of a stored prediction",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
async def get_overlay(rt: RuntimeDep, prediction_id: str, layer: str, params: OverlayDep) -> Response:
    """`layer` is an attended layer index (0 = shallowest) or `combined` (layers mixed by the global gates)."""
    stored = await lookup(rt, prediction_id)
    png = await run_in_threadpool(rt.render, stored, dataclasses.replace(params, layer=layer))
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})
