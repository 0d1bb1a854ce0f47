"""uvicorn's HTTP/1.1 connection, with a deadline for each request's head (`WARN_HEADER_TIMEOUT_S`).

uvicorn bounds the idle time between two requests, and only until a first byte arrives. Nothing bounds
how long a request line and its headers may take, nor a connection that sends nothing at all: such
connections cost a client next to nothing to hold, and `MAX_CONNECTIONS` of them turned every other
client away with 503. `python -m service` runs its workers on this protocol.
"""

from __future__ import annotations

import asyncio
from functools import cache

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings

PROTOCOL = "service.connection:HeadDeadline"  # uvicorn's --http, as an import string


@cache
def head_timeout_s() -> float:
    return Settings().HEADER_TIMEOUT_S


class HeadDeadline(HttpToolsProtocol):
    """Closes a connection whose request head has not arrived within `head_timeout_s()` of the connection
    opening, or of that request's first byte. The body's pace is the app's to bound (`BodyLimitMiddleware`)."""

    head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.head_timer is None:  # the first request keeps the deadline its connection started
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self.head_timer = self.loop.call_later(head_timeout_s(), self._expired)

    def _disarm(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _expired(self) -> None:
        self.head_timer = None
        if not self.transport.is_closing():
            self.transport.close()
