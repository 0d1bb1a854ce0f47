"""warn-predict against a running server: tables on stdout, overlays next to the images, clear failures."""

import shutil

import pytest
from PIL import Image

from service.client import main
from tests.serving.conftest import ROOT, Server, free_port, png


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_prints_tables_and_saves_overlays(server, tmp_path, capsys):
    digit = tmp_path / "digit.png"
    shutil.copy(ROOT / "docs/digit.png", digit)
    photo = tmp_path / "photo.png"
    photo.write_bytes(png(Image.new("RGB", (80, 60), (200, 120, 40))))
    code, out, _ = run([str(digit), str(photo), "--url", server.url, "--top-k", "2", "--format", "webp"], capsys)
    assert code == 0
    assert out.index(str(digit)) < out.index(str(photo))  # in the order given
    assert f"{digit}: 5 (" in out and "global gate" in out and "head gates" in out
    block = out.split(str(photo))[0]
    assert len([line for line in block.splitlines() if line[:1].isdigit()]) == 2  # --top-k 2
    for image in (digit, photo):
        for name in ("combined", "0", "1", "2"):
            saved = image.with_name(f"{image.stem}.warn-{name}.webp")
            with Image.open(saved) as overlay:
                assert overlay.format == "WEBP" and overlay.size[0] > 0


def test_failures_are_reported_per_image_and_in_the_exit_code(server, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    good = tmp_path / "good.png"
    shutil.copy(ROOT / "docs/digit.png", good)
    code, out, err = run([str(bad), str(good), "--url", server.url, "--overlays", "none"], capsys)
    assert code == 1 and "HTTP 415" in err and str(bad) in err
    assert f"{good}: 5 (" in out and not list(tmp_path.glob("*.warn-*"))
    code, _, err = run([str(good), "--url", f"http://127.0.0.1:{free_port()}"], capsys)
    assert code == 2 and "cannot reach" in err


def test_sends_the_api_key(model_path, tmp_path, capsys):
    server = Server({"WARN_MODEL_PATH": str(model_path), "WARN_API_KEY": "s3cret"})
    try:
        server.wait_ready()
        image = tmp_path / "digit.png"
        shutil.copy(ROOT / "docs/digit.png", image)
        code, _, err = run([str(image), "--url", server.url], capsys)
        assert code == 1 and "HTTP 401" in err
        code, out, _ = run([str(image), "--url", server.url, "--api-key", "s3cret", "--overlays", "combined"], capsys)
        assert code == 0 and image.with_name("digit.warn-combined.png").is_file()
    finally:
        server.stop()


def test_an_answer_without_overlay_urls_is_reported_with_its_warning(tmp_path):
    """While the service's prediction store is down it answers without overlay URLs, saying why."""
    import argparse

    import anyio
    import httpx

    from service.client import predict_one, report

    layer = {"name": "attention_0", "global_gate": 0.6, "top_class": {"label": "5", "probability": 0.9}}
    answer = {
        "top_k": [{"label": "5", "index": 5, "probability": 0.9}],
        "layers": [layer],
        "attention_urls": None,
        "warnings": ["no overlay URLs: the prediction store failed"],
    }
    seen = []

    def reply(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json=answer)

    image = tmp_path / "digit.png"
    image.write_bytes(png(Image.new("RGB", (8, 8))))
    args = argparse.Namespace(top_k=1, overlays="all", format="png", max_size=None, retries=0)

    async def predict() -> tuple[dict, list]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(reply), base_url="http://service") as client:
            return await predict_one(client, args, image)

    got, saved = anyio.run(predict)
    assert saved == [] and seen == ["/v1/predict"]  # no overlay fetched
    assert "warning: no overlay URLs: the prediction store failed" in report(image, got, saved)


def test_a_request_turned_away_for_now_is_sent_again_after_retry_after(tmp_path):
    """503 is the service's "retry shortly" (a full queue, a session or store restarting). Against a worker
    with WARN_QUEUE_SIZE=2, 16 requests in flight left 42 of 48 images failed; with retries, none."""
    import argparse

    import anyio
    import httpx

    from service.client import ServiceError, predict_one

    answer = {"top_k": [{"label": "5", "index": 5, "probability": 0.9}], "layers": [], "attention_urls": None}
    bodies: list[bytes] = []

    def replies(turned_away: int):
        def reply(request: httpx.Request) -> httpx.Response:
            bodies.append(request.read())
            if len(bodies) <= turned_away:
                return httpx.Response(
                    503, json={"error": "queue full", "code": "overloaded"}, headers={"Retry-After": "0"}
                )
            return httpx.Response(200, json=answer)

        return reply

    image = tmp_path / "digit.png"
    image.write_bytes(png(Image.new("RGB", (8, 8))))

    def predict(turned_away: int, retries: int):
        bodies.clear()
        args = argparse.Namespace(top_k=1, overlays="all", format="png", max_size=None, retries=retries)

        async def go():
            transport = httpx.MockTransport(replies(turned_away))
            async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
                return await predict_one(client, args, image)

        return anyio.run(go)

    got, _ = predict(turned_away=2, retries=2)
    assert got == answer and len(bodies) == 3
    assert all(image.read_bytes() in body for body in bodies)  # the whole upload each time
    with pytest.raises(ServiceError, match="queue full"):
        predict(turned_away=2, retries=1)
    assert len(bodies) == 2


def test_the_wait_before_a_retry_follows_retry_after_within_bounds():
    import httpx

    from service.client import MAX_RETRY_WAIT_S, retry_wait

    def wait(retry_after: str | None, attempt: int = 0) -> float:
        headers = {} if retry_after is None else {"Retry-After": retry_after.encode()}  # bytes: any octets
        return retry_wait(httpx.Response(503, headers=headers), attempt)

    assert 5 <= wait("5") <= 5 * 1.25
    assert 0.5 <= wait(None) <= 0.625 and 2 <= wait(None, 2) <= 2.5  # no Retry-After: doubling from 0.5 s
    for hostile in ("Wed, 21 Oct 2026 07:28:00 GMT", "-1", "1e9", "٣", ""):
        assert 0.5 <= wait(hostile) <= 0.625, hostile
    assert wait("9" * 500) <= MAX_RETRY_WAIT_S * 1.25 and wait(None, 10_000) <= MAX_RETRY_WAIT_S * 1.25


@pytest.mark.parametrize("retries", ["-1", "two", "1.5", "٣"])
def test_retries_must_be_a_whole_number(retries, capsys):
    code, _, err = run(["x.png", "--retries", retries], capsys)
    assert code == 2 and "--retries" in err
