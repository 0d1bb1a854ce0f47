"""Prometheus metrics: requests by route and status, latency, batch sizes, queue depth, inference time."""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """One registry per app, so several apps (tests) never clash.

    Under several workers (`python -m service` sets PROMETHEUS_MULTIPROC_DIR), each worker writes its
    values to files there and /metrics adds up every worker's.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        r = self.registry
        self.requests = Counter("warn_http_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.latency = Histogram(
            "warn_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.grpc_requests = Counter("warn_grpc_requests", "gRPC calls", ["method", "code"], registry=r)
        self.grpc_latency = Histogram(
            "warn_grpc_request_duration_seconds", "gRPC call latency", ["method"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "warn_batch_size", "Images per session.run", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.inference = Histogram(
            "warn_inference_duration_seconds", "session.run time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "warn_queue_depth", "Requests waiting for the model", registry=r, multiprocess_mode="livesum"
        )
        self.in_progress = Gauge(
            "warn_requests_in_progress",
            "Requests admitted (decoding, queued or running)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.stages = Histogram(
            "warn_stage_duration_seconds",
            "Per /v1 image: decode (bytes to model input, waiting for a decoding thread included) and model "
            "(queued for a batch, then its session.run)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("warn_images", "Images classified", registry=r)
        self.store_writes = Histogram(
            "warn_store_write_duration_seconds",
            "Storing a prediction for its overlay URLs, after its answer: waiting for the store (LMDB's write lock, "
            "the store writer's process, Redis) included. Rising here, with req/s flat, points at the store",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_failures = Counter(
            "warn_store_write_failures", "Predictions answered but not stored (their URLs answer 404)", registry=r
        )
        self.connections_closed = Counter(
            "warn_connections_closed",
            "HTTP connections closed by the service: head_timeout (a request's head not in by WARN_HEADER_TIMEOUT_S), "
            "head_too_large (a 431), send_timeout (an answer its client stopped reading: WARN_SEND_TIMEOUT_S)",
            ["reason"],
            registry=r,
        )
        # exported at 0 from the start, so rate() has a base
        for reason in ("head_timeout", "head_too_large", "send_timeout"):
            self.connections_closed.labels(reason)

    def observe_depth(self, queued: int, admitted: int) -> None:
        self.queue_depth.set(queued)
        self.in_progress.set(admitted)

    def exposition(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)
        return generate_latest(combined)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
        self.images.inc(size)


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (not the raw path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(method, path, str(status)).inc()
            self.metrics.latency.labels(method, path).observe(time.perf_counter() - started)
