"""Liveness, readiness and Prometheus metrics: open to probes and scrapers, never behind the API key."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.schemas import Live, Ready

router = APIRouter(tags=["health"])


@router.get("/v2/health/live", summary="Liveness", response_model=Live)
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    "/v2/health/ready",
    summary="Readiness: the model is loaded and serving",
    response_model=Ready,
    responses={
        503: {
            "model": Ready,
            "description": "not ready yet, shutting down, the shared session is restarting, or the model's run has "
            "gone on past WARN_MODEL_TIMEOUT_S",
        }
    },
)
async def ready(request: Request) -> Response:
    runtime = getattr(request.app.state, "runtime", None)
    ok = runtime is not None and runtime.unready() is None
    return Response(
        '{"ready":%s}' % ("true" if ok else "false"), status_code=200 if ok else 503, media_type="application/json"
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
