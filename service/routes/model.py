"""GET /v1/model: what is being served, on which execution provider, and how it was measured."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.deps import RuntimeDep
from service.schemas import ModelDescription, errors

router = APIRouter(prefix="/v1", tags=["model"])


@router.get(
    "/model",
    summary="Model metadata and the execution provider in use",
    response_model=ModelDescription,
    responses=errors(401, 500),
)
async def model(rt: RuntimeDep) -> dict[str, Any]:
    info, s = rt.info, rt.settings
    return {
        "name": info.name,
        "version": info.version,
        "providers": info.providers,
        "classes": info.class_names,
        "input_size": {"height": info.input_size[0], "width": info.input_size[1]},
        "resize": s.RESIZE,
        "attended_layers": [
            {"index": i, "stride": st, "pointing_game": pg}
            for i, (st, pg) in enumerate(zip(info.strides, info.pointing_game["layers"]))
        ],
        "pointing_game": info.pointing_game,
        "layer_names": info.layer_names,
        "batching": {
            "max_batch_size": s.MAX_BATCH_SIZE,
            "max_wait_ms": s.MAX_WAIT_MS,
            "queue_size": s.QUEUE_SIZE,
            "max_images_per_request": s.MAX_IMAGES_PER_REQUEST,
        },
        "metadata": {k: v for k, v in info.metadata.items() if k not in ("class_names",)},
    }
