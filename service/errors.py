"""Typed errors raised where a problem is found, and the one place that turns them into HTTP answers.

Every error body is JSON: {"error": "<what was wrong>", "code": "<machine-readable code>"}, which is
also the error shape the Open Inference Protocol specifies.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.request_id import request_id


class ServiceError(Exception):
    status = 500
    code = "internal_error"
    headers: dict[str, str] = {}

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BodyTooLarge(ServiceError):
    status, code = 413, "body_too_large"


class BodyTooSlow(ServiceError):
    status, code = 408, "body_too_slow"
    headers = {"Connection": "close"}


class ImageTooLarge(ServiceError):
    status, code = 413, "image_too_large"


class UnsupportedMedia(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidImage(ServiceError):
    status, code = 422, "invalid_image"


class InvalidRequest(ServiceError):
    status, code = 400, "invalid_request"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class Overloaded(ServiceError):
    status, code = 503, "overloaded"
    headers = {"Retry-After": "1"}


class ModelUnavailable(ServiceError):
    """The shared session's process did not answer (it died, or is being restarted), or the model has been on one
    run past WARN_MODEL_TIMEOUT_S."""

    status, code = 503, "model_unavailable"
    headers = {"Retry-After": "1"}


class ModelTimeout(ServiceError):
    """No outputs within WARN_MODEL_TIMEOUT_S of the request's admission."""

    status, code = 504, "model_timeout"


class StoreUnavailable(ServiceError):
    """The prediction store failed or did not answer within WARN_STORE_TIMEOUT_S (Redis down or hung)."""

    status, code = 503, "store_unavailable"
    headers = {"Retry-After": "5"}


class StartupError(RuntimeError):
    """Something the service needs cannot start; start-up stops with this message."""


class ModelLoadError(StartupError):
    """The model cannot be loaded; start-up stops with this message."""


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra
) -> JSONResponse:
    return JSONResponse({"error": message, "code": code, **extra}, status_code=status, headers=headers)


log = logging.getLogger("service.errors")


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(_: Request, e: ServiceError) -> JSONResponse:
        return error_response(e.status, e.code, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request"
        return error_response(422, "invalid_request", message, detail=jsonable(e.errors()))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect) -> Response:
        log.info("client left during %s %s", request.method, request.url.path)
        return Response(status_code=499)  # nobody reads it; nginx's code for a client that closed

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        # the last line of defence: still JSON, and the traceback goes to the log under the request's id.
        # Starlette answers this outside every middleware, so the id's header is set here.
        rid = request_id(request.scope) or "-"
        log.error("unhandled error on %s %s (request id %s)", request.method, request.url.path, rid, exc_info=e)
        message = f"internal server error (logged under request id {rid}); please report it with that id"
        return error_response(500, "internal_error", message, {"X-Request-ID": rid}, request_id=rid)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, "http_error", str(e.detail), getattr(e, "headers", None))


def jsonable(errors: list) -> list:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(errors, custom_encoder={bytes: lambda b: f"<{len(b)} bytes>"})
