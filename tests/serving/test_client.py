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
    args = argparse.Namespace(top_k=1, overlays="all", format="png", max_size=None)

    async def predict() -> tuple[dict, list]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(reply), base_url="http://service") as client:
            return await predict_one(client, args, image)

    got, saved = anyio.run(predict)
    assert saved == [] and seen == ["/v1/predict"]  # no overlay fetched
    assert "warning: no overlay URLs: the prediction store failed" in report(image, got, saved)
