"""HEAD on every GET route, as RFC 9110 asks of every server (link checkers, uptime monitors and
`curl -I` send it). FastAPI's routes answer only the methods they declare, so a HEAD runs as the GET
it asks about, and its body is dropped: the same status and headers, Content-Length included."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        inner = {**scope, "method": "GET"}
        try:
            await self.app(inner, receive, headers_only)
        finally:
            if "route" in inner:  # set by the router on the scope it was given; MetricsMiddleware labels by it
                scope["route"] = inner["route"]
