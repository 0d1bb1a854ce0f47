"""X-Request-ID: an id for every HTTP request, so that a client's report of a failed call finds its log line.

A client's own id (a proxy's, such as nginx's `$request_id`, or one it made) is kept where it is short and
plain; otherwise the service makes one. Either way the response carries it in `X-Request-ID`, and a 500
names it in its body and in the logged traceback.
"""

from __future__ import annotations

import os
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
SCOPE_KEY = "warn.request_id"
# Letters, digits and a few separators (UUIDs, hex, W3C trace ids with dashes): nothing that could split
# or forge a log line.
PLAIN = re.compile(rb"[A-Za-z0-9._:+=-]{1,128}")


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
        rid = given if given is not None and PLAIN.fullmatch(given) else os.urandom(16).hex().encode()
        scope[SCOPE_KEY] = rid.decode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (HEADER, rid)]
            await send(message)

        await self.app(scope, receive, send_with_id)
