"""The ASGI app: `uvicorn service.main:app`. Tests build their own with `create_app(Settings(...))`."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from PIL import Image, PngImagePlugin

from service import __version__, errors, overlay, workers
from service.auth import UrlSigner
from service.config import Settings
from service.decode import JPEG_MAX_SCANS, PNG_TEXT_BYTES
from service.deps import require_api_key, require_api_key_or_signature
from service.head import HeadAsGet
from service.limits import BodyBudget, BodyLimitMiddleware
from service.logs import show_service_logs
from service.memory import return_freed_memory, startup_objects_frozen, trim_heap
from service.metrics import Metrics, MetricsMiddleware
from service.pipeline import Runtime
from service.request_id import RequestIdMiddleware, log_request_ids
from service.routes import docs, health, model, predict, predictions, v2, viewer

log = logging.getLogger("service")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    show_service_logs()
    metrics = Metrics()
    # Pillow refuses past twice its MAX_IMAGE_PIXELS, also inside containers (ICO, TIFF): half ours
    Image.MAX_IMAGE_PIXELS = settings.MAX_IMAGE_PIXELS // 2
    PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_BYTES
    # a JPEG-compressed TIFF's strips are JPEGs too: libtiff reads this limit (scan numbers below it pass) per strip
    os.environ["LIBTIFF_JPEG_MAX_ALLOWED_SCAN_NUMBER"] = str(JPEG_MAX_SCANS + 1)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Settings | Metrics]]:
        log_request_ids()  # uvicorn has set up its access log by now
        return_freed_memory()
        overlay.one_blas_thread()
        try:
            runtime = Runtime(settings, metrics)
        except errors.ModelLoadError as e:
            log.error("cannot start: %s", e)
            raise  # uvicorn reports the failed start-up and exits non-zero
        await runtime.start()
        if (cpu := workers.claimed_core()) is not None:
            log.info("worker %d runs on CPU %d", os.getpid(), cpu)
        elif os.environ.get(workers.CORES_ENV):
            log.warning("worker %d found every core claimed by another; it runs on any", os.getpid())
        grpc = None
        if settings.GRPC_PORT:
            from service.grpc_v2 import GrpcServer

            grpc = GrpcServer(runtime, settings, metrics, app.state.body_budget)
            try:
                await grpc.start()
            except OSError as e:
                log.error("cannot start: %s", e)
                await runtime.stop()
                raise
        app.state.runtime = runtime
        try:
            with startup_objects_frozen():
                # uvicorn hands this state to each connection (service/connection.py)
                yield {"settings": settings, "metrics": metrics}
        finally:
            app.state.runtime = None
            if grpc:
                await grpc.stop()
            await runtime.stop()
            if metrics.multiprocess:
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(os.getpid())  # its live gauges leave the sum

    closed_docs = bool(settings.API_KEY) and not settings.PUBLIC_DOCS
    app = FastAPI(
        title="WARN inference service",
        version=__version__,
        lifespan=lifespan,
        description="Attention-gated image classification (Attend and Rectify, ECCV 2018) on onnxruntime.",
        docs_url=None,  # served by routes/docs.py, from local assets
        redoc_url=None,
        **({"openapi_url": None} if closed_docs else {}),
    )
    app.state.settings, app.state.metrics, app.state.runtime = settings, metrics, None
    app.state.api_keys = settings.api_keys()
    app.state.body_budget = BodyBudget(settings.MAX_BODY_BYTES_IN_FLIGHT, trim_heap)  # middleware, v2, gRPC
    signed = app.state.api_keys and settings.SIGNED_URLS
    app.state.signer = UrlSigner(app.state.api_keys, settings.STORE_TTL_S) if signed else None
    errors.install(app)
    guarded = [Depends(require_api_key)]
    app.include_router(health.router)
    for r in (predict.router, model.router, v2.router):
        app.include_router(r, dependencies=guarded)
    # the signature's query parameters only where they are read: solving them costs each GET about 50 us
    opened = require_api_key_or_signature if app.state.signer else require_api_key
    app.include_router(predictions.router, dependencies=[Depends(opened)])
    if settings.VIEWER:
        app.include_router(viewer.router)
        viewer.mount_assets(app)
    docs.mount_assets(app)
    app.include_router(docs.router(app, serve_openapi=closed_docs), dependencies=guarded if closed_docs else [])
    app.add_middleware(HeadAsGet)  # innermost: the routes see a GET, the metrics a HEAD
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.MAX_BODY_BYTES,
        read_timeout_s=settings.BODY_READ_TIMEOUT_S,
        min_rate=settings.BODY_MIN_RATE,
        budget=app.state.body_budget,
    )
    if settings.CORS_ORIGINS:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.CORS_ORIGINS,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer the app sends carries it
    return app


app = create_app()
