"""Request body limits, enforced while the body streams in: its size, how slowly it may arrive, and how many
bytes of bodies one worker holds at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyTooLarge, BodyTooSlow, Overloaded, error_response


class BodyBudget:
    """The bytes of request bodies one worker holds at once: what arrived, and what a route made of it (a
    decompressed v2 body, a gRPC message). Every user runs on the worker's event loop, so it needs no lock.

    Once `trim_after` bytes have passed and the worker has then held none for `quiet_s`, `trim` runs in a
    thread (service.memory.trim_heap: the heap a burst of bodies leaves behind goes back to the system)."""

    def __init__(
        self,
        limit: int,
        trim: Callable[[], object] | None = None,
        trim_after: int = 64 * 1024 * 1024,
        quiet_s: float = 1.0,
    ) -> None:
        self.limit = limit
        self.held = 0
        self.trim, self.trim_after, self.quiet_s = trim, trim_after, quiet_s
        self.since_trim = 0
        self.quiet: asyncio.TimerHandle | None = None

    def fits(self, n: int) -> bool:
        return self.held + n <= self.limit

    def take(self, n: int) -> None:
        """Hold `n` more bytes, or raise Overloaded (503) where they would pass the limit."""
        if not self.fits(n):
            raise Overloaded(self.refusal())
        self.held += n
        self.since_trim += n
        if self.quiet is not None:
            self.quiet.cancel()
            self.quiet = None

    def give(self, n: int) -> None:
        self.held -= n
        if self.held == 0 and self.trim is not None and self.since_trim >= self.trim_after and self.quiet is None:
            self.quiet = asyncio.get_running_loop().call_later(self.quiet_s, self._trim)

    def _trim(self) -> None:
        self.quiet = None
        self.since_trim = 0
        asyncio.get_running_loop().run_in_executor(None, self.trim)

    def refusal(self) -> str:
        return (
            f"this worker holds {self.held:,} bytes of request bodies, near its limit of {self.limit:,}; retry shortly"
        )


class BodyLimitMiddleware:
    """413 past `max_bytes`; 408 when any one read of the body waits more than `read_timeout_s`, or when the
    body falls behind `min_rate` bytes a second after its first `read_timeout_s` (a client trickling its
    upload holds a connection for nothing: a byte every few seconds kept one open indefinitely).

    And 503 when the bodies this worker holds, being read or read, would pass `budget`: each connection may
    hold a body of `max_bytes`, and a thousand connections a worker 16 GB. A body's bytes are counted as they
    arrive (a Content-Length claims nothing) until its request is answered."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        read_timeout_s: float = 30.0,
        min_rate: float = 0.0,
        *,
        budget: BodyBudget,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s
        self.min_rate = min_rate
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        message = f"request body is larger than the limit of {limit} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        if length is not None and length > limit:
            await error_response(413, BodyTooLarge.code, message)(scope, receive, send)
            return
        budget = self.budget
        if length is not None and not budget.fits(length):  # it could not be read whole: refused before any of it is
            await error_response(503, Overloaded.code, budget.refusal(), Overloaded.headers)(scope, receive, send)
            return
        seen = held = 0
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def limited() -> Message:
            nonlocal seen, held
            stall = loop.time() + self.read_timeout_s
            deadline = stall
            if self.min_rate:
                deadline = min(stall, started + self.read_timeout_s + seen / self.min_rate)
            try:
                async with asyncio.timeout_at(deadline):  # a timer, where wait_for made a task per read
                    msg = await receive()
            except TimeoutError:
                if deadline < stall:
                    raise BodyTooSlow(f"the request body arrived slower than {self.min_rate:g} bytes/s") from None
                raise BodyTooSlow(f"the request body stalled for more than {self.read_timeout_s:g} s") from None
            if msg["type"] == "http.request":
                size = len(msg.get("body", b""))
                seen += size
                if seen > limit:
                    raise BodyTooLarge(message)  # turned into a 413 by the app's error handlers
                budget.take(size)
                held += size
            return msg

        try:
            await self.app(scope, limited, send)
        finally:
            budget.give(held)
