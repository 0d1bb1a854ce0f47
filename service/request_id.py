"""X-Request-ID: an id for every HTTP request and gRPC call, so that a client's report of a failed call
finds its log line.

A client's own id (a proxy's, such as nginx's `$request_id`, or one it made) is kept where it is short and
plain; otherwise the service makes one. Either way the response carries it in `X-Request-ID` (a gRPC
call: in its trailing metadata `x-request-id`), a 500 (gRPC: INTERNAL) names it in its message and in the
logged traceback, and uvicorn's access line ends with it.
"""

from __future__ import annotations

import logging
import random
import re
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
SCOPE_KEY = "warn.request_id"
# Letters, digits and a few separators (UUIDs, hex, W3C trace ids with dashes): nothing that could split
# or forge a log line.
PLAIN = re.compile(rb"[A-Za-z0-9._:+=-]{1,128}")
# The id of the request the running task serves: uvicorn writes its access line from within that task.
CURRENT: ContextVar[str | None] = ContextVar("warn_request_id", default=None)


def kept_or_new(given: bytes | None) -> bytes:
    """The client's id where it is plain, else a new one."""
    return given if given is not None and PLAIN.fullmatch(given) else b"%032x" % random.getrandbits(128)


def request_id(scope: Scope) -> str | None:
    """The id RequestIdMiddleware gave this request."""
    return scope.get(SCOPE_KEY)


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == HEADER), None)
        rid = kept_or_new(given)
        scope[SCOPE_KEY] = rid.decode()
        CURRENT.set(scope[SCOPE_KEY])

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (HEADER, rid)]
            await send(message)

        await self.app(scope, receive, send_with_id)


class _TakeRequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = CURRENT.get()
        return True


class _EndsWithRequestId(logging.Formatter):
    """A formatter's line, then `request_id=` and the id of the request it is about, where there is one."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        line = self.inner.format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} request_id={rid}" if rid else line


def log_request_ids(logger: logging.Logger | None = None) -> None:
    """End each of uvicorn's access lines with its request's id, in whatever format uvicorn was told to use
    (once uvicorn has set up its logging; again is no harm)."""
    logger = logger or logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _TakeRequestId) for f in logger.filters):
        logger.addFilter(_TakeRequestId())
    for handler in logger.handlers:
        if not isinstance(handler.formatter, _EndsWithRequestId):
            handler.setFormatter(_EndsWithRequestId(handler.formatter or logging.Formatter()))
