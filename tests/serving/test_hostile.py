"""Hostile input and load against a real server process: bounded memory, JSON errors, nothing lost."""

import asyncio
import base64
import gzip
import io
import json
import random
import re
import socket
import statistics
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serving.conftest import ROOT, Server, encode, png


def rss_mb(pid: int) -> float:
    """Resident memory of a server and its worker processes."""
    total = 0
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for p in [pid, *map(int, children.read_text().split())]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


@pytest.fixture(scope="module")
def hostile_server(model_path):
    s = Server(
        {"WARN_MODEL_PATH": str(model_path), "WARN_WORKERS": "1", "WARN_BODY_READ_TIMEOUT_S": "1"}, launcher=True
    )
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_large_images_leave_no_memory_behind(hostile_server):
    """A 1.5 KB WebP of 16383x2400 once took 830 MB and the process kept its peak."""
    url = hostile_server.url
    big = encode(Image.new("RGB", (16383, 2400), (20, 120, 60)), "WEBP", lossless=True)
    with httpx.Client(timeout=60) as c:
        c.post(f"{url}/v1/predict", content=png(Image.new("RGB", (64, 64))), headers={"content-type": "image/png"})
        before = rss_mb(hostile_server.proc.pid)
        for _ in range(3):
            r = c.post(f"{url}/v1/attention", content=big, headers={"content-type": "image/webp"})
            assert r.status_code == 200 and max(Image.open(io.BytesIO(r.content)).size) <= 1024
            r = c.post(f"{url}/v1/predict", content=big, headers={"content-type": "image/webp"})
            assert r.status_code == 200
        time.sleep(0.3)
        after = rss_mb(hostile_server.proc.pid)
    assert after < 1500, f"{after:.0f} MB resident"
    assert after - before < 100, f"the process kept {after - before:.0f} MB after large images"


def test_a_gzip_of_thousands_of_images_is_refused_cheaply(hostile_server):
    one = base64.b64encode(png(Image.new("RGB", (1, 1)))).decode()
    body = gzip.compress(
        json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [8000], "data": [one] * 8000}]}).encode()
    )
    name = httpx.get(f"{hostile_server.url}/v1/model").json()["name"]
    before = rss_mb(hostile_server.proc.pid)
    r = httpx.post(
        f"{hostile_server.url}/v2/models/{name}/infer",
        content=body,
        headers={"content-type": "application/json", "content-encoding": "gzip"},
        timeout=60,
    )
    assert r.status_code == 413 and r.json()["code"] == "body_too_large"
    assert rss_mb(hostile_server.proc.pid) - before < 200


def test_a_stalled_body_is_a_408(hostile_server):
    def trickle():
        yield b"\x89PNG\r\n\x1a\n"
        time.sleep(2.5)
        yield b"rest"

    r = httpx.post(
        f"{hostile_server.url}/v1/predict", content=trickle(), headers={"content-type": "image/png"}, timeout=30
    )
    assert r.status_code == 408 and r.json()["code"] == "body_too_slow"
    assert httpx.get(f"{hostile_server.url}/v2/health/ready").status_code == 200


def test_a_request_head_past_64_kb_is_a_431_and_a_large_cookie_is_not(hostile_server):
    """httptools buffers a header however large it grows: one of 76 MB grew a worker by 131 MB."""
    address = ("127.0.0.1", hostile_server.port)
    with socket.create_connection(address) as conn:
        conn.settimeout(10)
        # 80 KB, the header unfinished; sent whole, so that the server has read all of it when it closes
        conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 80_000)
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431") and b'"code": "headers_too_large"' in answer, answer[:200]
    metrics = httpx.get(f"{hostile_server.url}/metrics", timeout=10).text
    assert 'warn_connections_closed_total{reason="head_too_large"}' in metrics
    cookie = b"Cookie: session=" + b"c" * 30000 + b"\r\n"
    with socket.create_connection(address) as conn:
        conn.settimeout(10)
        conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + cookie + b"\r\n")
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")


def test_large_uploads_one_after_another_on_one_connection_are_answered(hostile_server):
    """The end of a body and the next request's head can arrive in one read: counted as head, 64 KB of body
    made every later request on the connection a 431 (make bench saw it; the tests' small bodies did not)."""
    rng = np.random.default_rng(0)
    noise = png(Image.fromarray(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)))
    assert len(noise) > 300_000
    with httpx.Client(timeout=30) as c:
        for _ in range(6):
            r = c.post(f"{hostile_server.url}/v1/predict", content=noise, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text[:200]


def test_a_body_that_trickles_is_a_408(hostile_server):
    """A byte every 0.3 s never stalls a read for the second WARN_BODY_READ_TIMEOUT_S allows, and held a
    connection for as long as the client liked: past that second it must keep WARN_BODY_MIN_RATE (1,000 B/s)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", hostile_server.port)) as conn:
        conn.settimeout(10)
        conn.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\n")
        answer = b""
        for byte in b"\x89PNG" * 25:
            conn.sendall(bytes([byte]))
            time.sleep(0.3)
            conn.setblocking(False)
            try:
                answer = conn.recv(4096)
            except BlockingIOError:
                continue
            finally:
                conn.setblocking(True)
            break
    assert answer.startswith(b"HTTP/1.1 408") and b"bytes/s" in answer, answer
    assert time.monotonic() - started < 5


def test_soak_mixed_traffic_loses_nothing_and_memory_stays_flat(hostile_server):
    """About 40 s of valid and invalid requests at 16 connections."""
    url = hostile_server.url
    rng = random.Random(0)
    valid = [
        png(Image.new("RGB", (rng.randint(20, 300), rng.randint(20, 300)), (i * 9 % 255, 40, 90))) for i in range(20)
    ]
    jpeg = encode(Image.effect_noise((800, 600), 40).convert("RGB"), "JPEG")
    invalid = [
        (b"not an image", "image/png", 415),
        (b"", "image/png", 422),
        (png(Image.new("RGB", (8, 8)))[:40], "image/png", 415),  # cut inside its header: not identifiable
        (b"{}", "text/plain", 415),
    ]
    answers: list[tuple[int, int, str | None]] = []  # (status, expected, id)
    samples: list[float] = []

    async def client(http: httpx.AsyncClient, stop: float, seed: int):
        r = random.Random(seed)
        while time.monotonic() < stop:
            if r.random() < 0.7:
                body = jpeg if r.random() < 0.2 else r.choice(valid)
                ctype = "image/jpeg" if body is jpeg else "image/png"
                resp = await http.post(f"{url}/v1/predict", content=body, headers={"content-type": ctype})
                answers.append((resp.status_code, 200, resp.json().get("id")))
            else:
                body, ctype, want = r.choice(invalid)
                resp = await http.post(f"{url}/v1/predict", content=body, headers={"content-type": ctype})
                assert resp.headers["content-type"] == "application/json"
                answers.append((resp.status_code, want, None))

    async def sampler(stop: float):
        while time.monotonic() < stop:
            samples.append(rss_mb(hostile_server.proc.pid))
            await asyncio.sleep(1)

    async def main():
        stop = time.monotonic() + 40
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=16)) as http:
            await asyncio.gather(sampler(stop), *(client(http, stop, i) for i in range(16)))
            ids = [a[2] for a in answers if a[2]][-500:]  # the store keeps the newest 1,000 (WARN_STORE_MAX_ITEMS)
            fetched = [(await http.get(f"{url}/v1/predictions/{i}")).status_code for i in ids]
            return fetched

    fetched = asyncio.run(main())
    statuses = [a[0] for a in answers]
    assert not [s for s in statuses if s >= 500], "server errors under mixed load"
    wrong = {(got, want) for got, want, _ in answers if got != want}
    assert not wrong, f"answers with the wrong status (got, expected): {wrong}"
    assert len(answers) > 200 and set(fetched) == {200}, "a valid prediction was not fetchable afterwards"
    # Growth, not spikes: 16 requests in flight and 8 stores behind the answers hold up to about 50 MB
    # between one second and the next, so single samples swing 1.2x; a leak moves the level.
    warm = samples[len(samples) // 4 :]
    third = len(warm) // 3
    early, late = statistics.median(warm[:third]), statistics.median(warm[-third:])
    assert late <= 1.15 * early, f"RSS grew from {early:.0f} to {late:.0f} MB (medians) after warm-up"


def test_connections_that_never_finish_a_request_head_are_closed(model_path):
    """uvicorn bounds only the idle time between requests: connections that sent nothing, or a header a byte at
    a time, stayed open for good, and MAX_CONNECTIONS of them turned every other client away with 503."""
    env = {"WARN_WORKERS": "1", "WARN_MAX_CONNECTIONS": "8", "WARN_HEADER_TIMEOUT_S": "3"}
    s = Server({"WARN_MODEL_PATH": str(model_path), **env}, launcher=True)
    address = ("127.0.0.1", s.port)
    try:
        s.wait_ready()
        silent = [socket.create_connection(address) for _ in range(8)]
        assert httpx.get(f"{s.url}/v2/health/live", timeout=10).status_code == 503  # every slot held
        trickle = socket.create_connection(address)
        for byte in b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n":  # a byte every 0.1 s does not move the deadline
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
        for conn in [*silent, trickle]:
            conn.settimeout(5)
            assert conn.recv(1) == b"", "a connection without a request head is still open"
            conn.close()
        assert httpx.get(f"{s.url}/v2/health/live", timeout=10).status_code == 200
        metrics = httpx.get(f"{s.url}/metrics", timeout=10).text  # what an operator sees of it
        assert 'warn_connections_closed_total{reason="head_timeout"} 9.0' in metrics

        with socket.create_connection(address) as conn:  # a head in parts, within the deadline, is answered
            conn.settimeout(10)
            for _ in range(2):  # and each request on a kept-alive connection has a deadline of its own
                conn.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
                time.sleep(0.6)
                conn.sendall(b"Host: x\r\n\r\n")
                answer = b""
                while not answer.endswith(b'{"live":true}'):
                    answer += conn.recv(4096) or pytest.fail(f"closed after {answer!r}")
                assert answer.startswith(b"HTTP/1.1 200")
    finally:
        s.stop()


def test_a_client_that_never_reads_its_answers_is_closed(model_path):
    """A client may send its requests (here, overlays pipelined on one connection) and read nothing: the
    answer waits on the kernel's buffer and then in the worker's, and its connection stayed open mid-answer
    for good, where uvicorn's keep-alive timeout does not reach. MAX_CONNECTIONS of them turned every other
    client away with 503. Past WARN_SEND_TIMEOUT_S without a byte read, the connection is closed."""
    env = {"WARN_WORKERS": "1", "WARN_MAX_CONNECTIONS": "4", "WARN_SEND_TIMEOUT_S": "3", "WARN_STORE": "memory"}
    s = Server({"WARN_MODEL_PATH": str(model_path), **env}, launcher=True)
    try:
        s.wait_ready()
        digit = (ROOT / "docs/digit.png").read_bytes()
        answer = httpx.post(f"{s.url}/v1/predict", content=digit, headers={"content-type": "image/png"}).json()
        path = answer["attention_urls"]["combined"].removeprefix(s.url)  # a 496 KB PNG
        readers = []
        for c in range(4):
            conn = socket.create_connection(("127.0.0.1", s.port))
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            # more than the kernel's send buffer holds (4 MB): the rest waits in the worker
            requests = (f"GET {path}?alpha=0.{c}{i:02d} HTTP/1.1\r\nHost: x\r\n\r\n" for i in range(16))
            conn.sendall("".join(requests).encode())
            readers.append(conn)

        def live_until(status: int, why: str) -> None:
            deadline = time.monotonic() + 60
            while httpx.get(f"{s.url}/v2/health/live", timeout=10).status_code != status:
                assert time.monotonic() < deadline, why
                time.sleep(0.1)

        live_until(503, "the four connections never held every slot")
        live_until(200, "the clients that read nothing held their connections")
        metrics = httpx.get(f"{s.url}/metrics", timeout=10).text
        closed = re.search(r'warn_connections_closed_total\{reason="send_timeout"\} (\S+)', metrics)
        assert closed and float(closed.group(1)) >= 1
        for conn in readers:
            conn.close()
    finally:
        s.stop()


def test_slow_uploads_hold_no_place_in_the_queue(model_path):
    """A place in the queue is for decoding and inference. A v2 request took its place before it read its body,
    so as many clients as WARN_QUEUE_SIZE, each trickling a body, turned every other request away with 503."""
    s = Server({"WARN_MODEL_PATH": str(model_path), "WARN_WORKERS": "1", "WARN_QUEUE_SIZE": "2"}, launcher=True)
    try:
        s.wait_ready()
        slow = []
        for _ in range(3):
            conn = socket.create_connection(("127.0.0.1", s.port))
            conn.sendall(
                b"POST /v2/models/warn-cluttered-digits/infer HTTP/1.1\r\nHost: x\r\n"
                b'Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"inputs": '
            )
            slow.append(conn)
        time.sleep(0.5)  # each is now waiting for the rest of its body
        digit = (ROOT / "docs/digit.png").read_bytes()
        r = httpx.post(f"{s.url}/v1/predict", content=digit, headers={"content-type": "image/png"}, timeout=10)
        assert r.status_code == 200, r.text
        v2 = httpx.post(
            f"{s.url}/v2/models/warn-cluttered-digits/infer",
            json={"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 48, 48], "data": [0.5] * 6912}]},
            timeout=10,
        )
        assert v2.status_code == 200, v2.text
        for conn in slow:
            conn.close()
    finally:
        s.stop()


def test_the_bodies_a_worker_holds_are_bounded_in_total(model_path):
    """Each connection may send a body of WARN_MAX_BODY_BYTES, slowly: a thousand connections a worker held
    16 GB. Past WARN_MAX_BODY_BYTES_IN_FLIGHT a worker answers 503, and what it held is released with each
    request, a client that hung up included."""
    env = {
        "WARN_MODEL_PATH": str(model_path),
        "WARN_WORKERS": "1",
        "WARN_MAX_BODY_BYTES": "1000000",
        "WARN_MAX_BODY_BYTES_IN_FLIGHT": "2000000",
        "WARN_BODY_READ_TIMEOUT_S": "20",
    }
    s = Server(env, launcher=True)
    digit = (ROOT / "docs/digit.png").read_bytes()  # 540 KB
    url = f"{s.url}/v1/predict"
    try:
        s.wait_ready()
        held = []
        for _ in range(2):  # 900 KB of 1 MB each, then nothing: 1.8 MB held
            conn = socket.create_connection(("127.0.0.1", s.port))
            conn.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n\r\n"
            )
            conn.sendall(digit[:500_000] + bytes(400_000))
            held.append(conn)
        deadline = time.monotonic() + 20  # until the worker has read what they sent (a busy machine is slow)
        while (
            refused := httpx.post(url, content=digit, headers={"content-type": "image/png"}, timeout=10)
        ).status_code == 200:
            assert time.monotonic() < deadline, "the worker never held the two bodies"
            time.sleep(0.2)
        assert refused.status_code == 503 and refused.json()["code"] == "overloaded", refused.text
        assert refused.headers["retry-after"] == "1" and "bytes of request bodies" in refused.json()["error"]
        chunked = httpx.post(
            url, content=iter([digit[:300_000], digit[300_000:]]), headers={"content-type": "image/png"}
        )
        assert chunked.status_code == 503  # no length to judge by: refused once what arrived passes the limit
        assert httpx.get(f"{s.url}/v2/health/ready").status_code == 200  # no body, no limit
        for conn in held:
            conn.close()
        deadline = time.monotonic() + 20  # until the worker has seen them hang up
        while (
            r := httpx.post(url, content=digit, headers={"content-type": "image/png"}, timeout=10)
        ).status_code == 503:
            assert time.monotonic() < deadline, "what the two held was never given back"
            time.sleep(0.2)
        assert r.status_code == 200, r.text
    finally:
        s.stop()
