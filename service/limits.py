"""Request body limits, enforced while the body streams in: its size, and how slowly it may arrive."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyTooLarge, BodyTooSlow, error_response


class BodyLimitMiddleware:
    """413 past `max_bytes`; 408 when any one read of the body waits more than `read_timeout_s`
    (a client trickling its upload holds a connection and a decode place for nothing)."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        message = f"request body is larger than the limit of {limit} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await error_response(413, BodyTooLarge.code, message)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            try:
                async with asyncio.timeout(self.read_timeout_s):  # a timer, where wait_for made a task per read
                    msg = await receive()
            except TimeoutError:
                raise BodyTooSlow(f"the request body stalled for more than {self.read_timeout_s:g} s") from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(message)  # turned into a 413 by the app's error handlers
            return msg

        await self.app(scope, limited, send)
