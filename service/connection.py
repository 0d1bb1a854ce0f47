"""uvicorn's HTTP/1.1 connection, with a deadline (`WARN_HEADER_TIMEOUT_S`) and a size limit for each
request's head, and a deadline for a client that stops reading its answer (`WARN_SEND_TIMEOUT_S`).

It also turns Nagle's algorithm off on every TCP connection (TCP_NODELAY). uvloop does so itself, but
asyncio's loop (`UVICORN_LOOP=asyncio`) only for a listening socket bound with protocol IPPROTO_TCP, and
uvicorn binds its workers' socket with 0 (Kludex/uvicorn#3149): a response's body, written after its
head, then waited for the client's delayed acknowledgement (a photo at one connection: 48 ms, not 4).

uvicorn bounds the idle time between two requests, and only until a first byte arrives. Nothing bounds
how long a request line and its headers may take, nor a connection that sends nothing at all: such
connections cost a client next to nothing to hold, and `MAX_CONNECTIONS` of them turned every other
client away with 503. Nor, with httptools, their size: one header of 76 MB grew a worker by 131 MB.
Nor a client that sends its request and never reads the answer: the answer stays in the worker's memory,
and the connection open, for good (300 such clients of a 496 KB overlay: 128 MB, still there a minute on).
`python -m service` runs its workers on this protocol.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings

PROTOCOL = "service.connection:HeadDeadline"  # uvicorn's --http, as an import string
MAX_HEAD_BYTES = 64 * 1024  # request line and headers; h11's own limit is 16 KB, nginx's 32 KB


class HeadDeadline(HttpToolsProtocol):
    """Closes a connection whose request head has not arrived within the app's `HEADER_TIMEOUT_S` of the
    connection opening, or of that request's first byte; answers 431 and closes one whose head outgrows
    `MAX_HEAD_BYTES`. The body's pace is the app's to bound (`BodyLimitMiddleware`). The app's lifespan hands
    its settings and metrics to uvicorn, which hands them to each connection (`app_state`)."""

    head_timer: asyncio.TimerHandle | None = None
    send_timer: asyncio.TimerHandle | None = None
    awaiting_head = True
    head_bytes = 0  # received while a head is awaited, from the read after the one that ended the last request
    ended_in_this_read = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        no_delay(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        self.ended_in_this_read = False
        super().data_received(data)
        # a read that ended the last request is mostly its body: not counted (a pipelined head's start is
        # then left out, at most one read)
        if self.awaiting_head and not self.ended_in_this_read and not self.transport.is_closing():
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.head_timer is None:  # the first request keeps the deadline its connection started
            self._arm()

    def on_headers_complete(self) -> None:
        self.awaiting_head, self.head_bytes = False, 0
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.awaiting_head, self.ended_in_this_read = True, True

    def _refuse_head(self) -> None:
        self._disarm()
        self._count("head_too_large")
        message = f"the request line and headers are larger than {MAX_HEAD_BYTES} bytes"
        body = json.dumps({"error": message, "code": "headers_too_large"}).encode()
        head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
        self.transport.write(head + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._send_progressed()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The transport holds more than its high-water mark of the answer: the client must read some of it
        within SEND_TIMEOUT_S. A client reading slowly resumes the transport, and the deadline, often."""
        super().pause_writing()
        if self.send_timer is None:
            self.send_timer = self.loop.call_later(self._setting("SEND_TIMEOUT_S"), self._send_expired)

    def resume_writing(self) -> None:
        self._send_progressed()
        super().resume_writing()

    def _send_progressed(self) -> None:
        self.send_timer = cancelled(self.send_timer)

    def _send_expired(self) -> None:
        self.send_timer = None
        if not self.transport.is_closing():
            self._count("send_timeout")
            reset(self.transport)

    def _arm(self) -> None:
        self.head_timer = self.loop.call_later(self._setting("HEADER_TIMEOUT_S"), self._expired)

    def _setting(self, name: str) -> float:
        """The app's setting (uvicorn hands its state to each connection), or its default without one."""
        settings = self.app_state.get("settings")
        return Settings.model_fields[name].default if settings is None else getattr(settings, name)

    def _disarm(self) -> None:
        self.head_timer = cancelled(self.head_timer)

    def _expired(self) -> None:
        self.head_timer = None
        if not self.transport.is_closing():
            self._count("head_timeout")
            self.transport.close()

    def _count(self, reason: str) -> None:
        if (metrics := self.app_state.get("metrics")) is not None:
            metrics.connections_closed.labels(reason).inc()


def cancelled(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


def reset(transport: asyncio.Transport) -> None:
    """Drop a connection and what it has not sent: with SO_LINGER at 0 the kernel resets it, where a close
    kept up to 4 MB of unsent answer per connection in its buffers, for minutes, for a client reading none."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def no_delay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle's algorithm off for a TCP connection (a Unix socket has none)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # the peer has already gone
            pass
