"""The service's HTTP connection (service/connection.py) on a real uvicorn server, in this process."""

from __future__ import annotations

import socket
import threading

import pytest
import uvicorn

from service.connection import HeadDeadline


async def answer(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_every_connection_has_nagle_off_on_either_event_loop(loop):
    """uvicorn's workers listen on a socket bound with protocol 0, as here, and asyncio then left Nagle's algorithm
    on: each response's body waited for the client's delayed ACK of its head, 44 ms a request at one connection
    (`UVICORN_LOOP=asyncio python -m service`, wrk at one connection; 4 ms with it off)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # proto 0: uvicorn's Config.bind_socket
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    server = uvicorn.Server(uvicorn.Config(answer, loop=loop, http=HeadDeadline, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while not reply.endswith(b"ok"):
                reply += client.recv(4096) or pytest.fail(f"closed after {reply!r}")
            assert reply.startswith(b"HTTP/1.1 200")
            (connection,) = server.server_state.connections  # this client's, kept alive
            sock = connection.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()
