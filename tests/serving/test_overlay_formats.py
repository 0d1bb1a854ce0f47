"""Overlays as dashboards fetch them: formats, the render cache, size caps, refusals before work, and
revalidation (ETag, 304) and HEAD, for overlays and stored predictions."""

import io
import threading
import time

from PIL import Image

from tests.serving.conftest import encode, make_client, png


def test_formats_by_extension_and_parameter(client):
    image = png(Image.new("RGB", (90, 60), (40, 90, 200)))
    body = client.post("/v1/predict", content=image, headers={"content-type": "image/png"}).json()
    base = body["attention_urls"]["combined"].removesuffix(".png")
    for url, fmt, media in [
        (f"{base}.webp", "WEBP", "image/webp"),
        (f"{base}.jpeg", "JPEG", "image/jpeg"),
        (f"{base}.jpg", "JPEG", "image/jpeg"),
        (f"{base}.png?format=webp", "WEBP", "image/webp"),
    ]:
        r = client.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == media, url
        img = Image.open(io.BytesIO(r.content))
        assert img.format == fmt and img.size == (90, 60)
    bad = client.get(f"{base}.gif")
    assert bad.status_code == 400 and "extension" in bad.json()["error"]
    att = client.post("/v1/attention?format=jpeg", content=image, headers={"content-type": "image/png"})
    assert att.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(att.content)).format == "JPEG"


def test_a_rendered_overlay_is_cached_by_its_parameters(client):
    image = png(Image.new("RGB", (64, 64), (200, 30, 30)))
    body = client.post("/v1/predict", content=image, headers={"content-type": "image/png"}).json()
    rt = client.app.state.runtime
    calls = []
    original = rt.render
    rt.render = lambda stored, picture, p: (calls.append(p), original(stored, picture, p))[1]
    try:
        url = body["attention_urls"]["1"]
        first, again = client.get(url, params={"alpha": 0.3}), client.get(url, params={"alpha": 0.3})
        other = client.get(url, params={"alpha": 0.7})
    finally:
        rt.render = original
    assert first.content == again.content and other.content != first.content
    assert len(calls) == 2, "the repeated fetch came from the cache"


def test_one_call_attention_is_capped_like_stored_overlays(model_path):
    """A 1.5 KB lossless WebP of 16383x2400 must not come back at 16383x2400."""
    big = encode(Image.new("RGB", (16383, 2400), (20, 120, 60)), "WEBP", lossless=True)
    assert len(big) < 50_000
    with make_client(model_path, STORE_IMAGE_MAX_SIZE=1024) as c:
        r = c.post("/v1/attention", content=big, headers={"content-type": "image/webp"})
        assert r.status_code == 200
        w, h = capped = Image.open(io.BytesIO(r.content)).size
        assert 512 < w <= 1024 and h == round(w * 2400 / 16383)
        small = c.post("/v1/attention?max_size=200", content=big, headers={"content-type": "image/webp"})
        w, h = Image.open(io.BytesIO(small.content)).size
        assert 100 < w <= 200 and abs(h - w * 2400 / 16383) <= 1
        # stored (not a JPEG: decoded at the overlay's scale, its pixels kept), it comes back under the same cap
        body = c.post("/v1/predict", content=big, headers={"content-type": "image/webp"}).json()
        stored = c.get(body["attention_urls"]["combined"])
        assert stored.status_code == 200 and Image.open(io.BytesIO(stored.content)).size == capped


def test_a_full_service_refuses_before_decoding(model_path):
    with make_client(model_path, QUEUE_SIZE=1, MAX_BATCH_SIZE=1) as c:
        rt = c.app.state.runtime
        gate, decodes = threading.Event(), []
        original_prepare, original_run = rt.prepare, rt.batcher._run
        rt.prepare = lambda *a: (decodes.append(1), original_prepare(*a))[1]
        rt.batcher._run = lambda x: (gate.wait(5), original_run(x))[1]
        image = png(Image.new("RGB", (16, 16)))
        results = []

        def call():
            results.append(c.post("/v1/predict", content=image, headers={"content-type": "image/png"}))

        first = threading.Thread(target=call)
        first.start()
        deadline = time.monotonic() + 5
        while not decodes and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # the first request now holds the only place, waiting on the model
        refused = c.post("/v1/predict", content=image, headers={"content-type": "image/png"})
        gate.set()
        first.join(10)
        assert refused.status_code == 503 and refused.json()["code"] == "overloaded"
        assert refused.headers["retry-after"] == "1"
        assert len(decodes) == 1, "the refused request was never decoded"
        assert results[0].status_code == 200


def test_layer_names_that_are_not_ascii_digits_are_a_400(client):
    image = png(Image.new("RGB", (32, 32)))
    body = client.post("/v1/predict", content=image, headers={"content-type": "image/png"}).json()
    base = body["attention_urls"]["0"].rsplit("/", 1)[0]
    for layer in ("%C2%B2", "%D9%A1", "9" * 5000, "-1", "07"):
        r = client.get(f"{base}/{layer}.png")
        assert r.status_code in (400, 200) and r.headers["content-type"].startswith(("application/json", "image/"))
        if r.status_code == 400:
            assert r.json()["code"] == "invalid_request"
    att = client.post("/v1/attention?layer=%C2%B2", content=image, headers={"content-type": "image/png"})
    assert att.status_code == 400 and att.json()["code"] == "invalid_request"


def test_a_revalidated_overlay_is_304_and_not_drawn(client):
    image = png(Image.new("RGB", (64, 48), (30, 160, 90)))
    body = client.post("/v1/predict", content=image, headers={"content-type": "image/png"}).json()
    url = body["attention_urls"]["combined"]
    first = client.get(url)
    tag = first.headers["etag"]
    assert first.status_code == 200 and tag.startswith('W/"') and first.headers["cache-control"]
    rt = client.app.state.runtime
    original = rt.overlay

    async def no_drawing(*args):
        raise AssertionError("a revalidated overlay was drawn")

    rt.overlay = no_drawing
    try:
        for sent in (tag, tag.removeprefix("W/"), f'"other", {tag}', "*"):
            again = client.get(url, headers={"if-none-match": sent})
            assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == tag, sent
        # a layer out of range, or an id that is gone, is refused as it is without the header
        base = url.removesuffix("combined.png")
        assert client.get(base + "9.png", headers={"if-none-match": "*"}).status_code == 400
        gone = client.get(url.replace(body["id"], "0" * 32), headers={"if-none-match": tag})
        assert gone.status_code == 404
    finally:
        rt.overlay = original
    # other parameters, another format, a stale tag, or a list too long to read: drawn and sent
    flood = ", ".join(['W/"x"'] * 2000 + [tag])
    assert client.get(url, headers={"if-none-match": flood}).status_code == 200
    for other, headers in [
        (url + "?alpha=0.2", {"if-none-match": tag}),
        (url.replace(".png", ".jpeg"), {}),
        (url, {"if-none-match": 'W/"stale"'}),
    ]:
        r = client.get(other, headers=headers)
        assert r.status_code == 200 and r.content, other
        assert (r.headers["etag"] == tag) == (other == url)


def test_head_answers_what_get_would_without_the_body(client):
    image = png(Image.new("RGB", (64, 48), (90, 30, 160)))
    body = client.post("/v1/predict", content=image, headers={"content-type": "image/png"}).json()
    url = body["attention_urls"]["1"].replace(".png", ".jpeg")
    got, head = client.get(url), client.head(url)
    assert head.status_code == 200 and head.content == b""
    for name in ("content-type", "content-length", "etag", "cache-control"):
        assert head.headers[name] == got.headers[name], name
    assert client.head(url, headers={"if-none-match": got.headers["etag"]}).status_code == 304
    assert client.head(url.replace(body["id"], "0" * 32)).status_code == 404
    assert client.head("/v2/health/live").status_code == 200
    refused = client.head("/v1/predict")  # a POST-only route: what GET gets
    assert refused.status_code == 405 and refused.content == b"" and "POST" in refused.headers["allow"]
    metrics = client.get("/metrics").text
    route = "/v1/predictions/{prediction_id}/attention/{layer}.{ext}"
    assert f'method="HEAD",route="{route}",status="200"' in metrics


def test_a_stored_prediction_revalidates_like_its_overlays(client):
    image = png(Image.new("RGB", (40, 40), (10, 200, 40)))
    body = client.post("/v1/predict", content=image, headers={"content-type": "image/png"}).json()
    url = f"/v1/predictions/{body['id']}"
    first = client.get(url)
    tag = first.headers["etag"]
    stored = first.json()
    assert first.status_code == 200 and stored["timings_ms"] is None
    for key in ("id", "top_k", "global_gates", "attention_urls"):
        assert stored[key] == body[key], key
    again = client.get(url, headers={"if-none-match": tag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == tag
    overlay = client.get(body["attention_urls"]["combined"]).headers["etag"]
    assert overlay != tag and client.get(url, headers={"if-none-match": overlay}).status_code == 200
    assert client.get(url.replace(body["id"], "0" * 32), headers={"if-none-match": "*"}).status_code == 404
