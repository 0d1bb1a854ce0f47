"""Bad input gets a clear JSON error; unusual but valid images work; the service keeps answering."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.serving.conftest import encode, make_client, png

RGB = Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 90, 3), dtype=np.uint8))


def post(client, data: bytes, ctype: str = "image/png"):
    return client.post("/v1/predict", content=data, headers={"content-type": ctype})


@pytest.mark.parametrize(
    ("data", "ctype", "status", "code"),
    [
        (b"", "image/png", 422, "invalid_image"),
        (b"this is not an image", "image/png", 415, "unsupported_media_type"),
        (png(RGB)[:200], "image/png", 422, "invalid_image"),  # truncated
        (encode(RGB, "JPEG")[:300], "image/jpeg", 422, "invalid_image"),  # truncated JPEG
        (b"%PDF-1.4 not an image", "application/octet-stream", 415, "unsupported_media_type"),
        (png(RGB), "text/plain", 415, "unsupported_media_type"),
        (png(RGB), "application/json", 415, "unsupported_media_type"),
    ],
)
def test_bad_images(client, data, ctype, status, code):
    r = post(client, data, ctype)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code and body["error"]


def test_corrupt_pixel_data(client):
    data = bytearray(png(RGB))
    idat = data.index(b"IDAT")
    data[idat + 8 : idat + 40] = b"\x00" * 32  # garbage inside the compressed stream
    r = post(client, bytes(data))
    assert r.status_code == 422 and "corrupt" in r.json()["error"]


def test_multipart_without_file(client):
    r = client.post("/v1/predict", data={"image": "x"}, files={"other": ("a.txt", b"x", "text/plain")})
    assert r.status_code == 400 and "'file'" in r.json()["error"]


@pytest.mark.parametrize("route", ["/v1/predict", "/v1/attention"])
def test_multipart_with_more_than_one_image_is_refused(client, route):
    """Not one of them classified in silence (it used to be the last)."""
    two = [("file", ("a.png", png(RGB), "image/png")), ("file", ("b.png", png(RGB), "image/png"))]
    r = client.post(route, files=two)
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"
    assert "one image per request" in r.json()["error"] and "Maximum number of files is 1" in r.json()["error"]
    r = client.post(route, files=[two[0], ("extra", ("c.png", png(RGB), "image/png"))])  # under another name too
    assert r.status_code == 400 and "one image per request" in r.json()["error"]
    fields = {f"f{i}": "x" for i in range(17)}
    r = client.post(route, data=fields, files=[two[0]])
    assert r.status_code == 400 and "Maximum number of fields" in r.json()["error"]
    assert client.post(route, data={"note": "x"}, files=[two[0]]).status_code == 200


def test_body_limit_by_content_length_and_while_streaming(model_path):
    with make_client(model_path, MAX_BODY_BYTES=10_000) as c:
        big = png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)))
        r = post(c, big)
        assert r.status_code == 413 and r.json()["code"] == "body_too_large"

        def chunks():  # no Content-Length: the limit must trip while reading
            for i in range(0, len(big), 4096):
                yield big[i : i + 4096]

        r = c.post("/v1/predict", content=chunks(), headers={"content-type": "image/png"})
        assert r.status_code == 413 and r.json()["code"] == "body_too_large"
        small = png(RGB.resize((20, 20)))
        assert len(small) < 10_000 and post(c, small).status_code == 200


def test_pixel_limit_refuses_before_decoding(model_path):
    # A 20000x20000 PNG header with a tiny body: refused from the header alone.
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
    bomb += chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")
    with make_client(model_path, MAX_IMAGE_PIXELS=1_000_000) as c:
        r = post(c, bomb)
        assert r.status_code == 413 and r.json()["code"] == "image_too_large" and "1000000" in r.json()["error"]
        assert post(c, png(RGB)).status_code == 200


def exif_rotated() -> bytes:
    img = Image.new("RGB", (80, 40), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return encode(img, "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.new("P", (30, 30), i) for i in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "size"),
    [
        ("greyscale", png(RGB.convert("L")), (90, 60)),
        ("16-bit", png(Image.fromarray((np.arange(60 * 90).reshape(60, 90) * 12).astype(np.uint16))), (90, 60)),
        ("palette", png(RGB.convert("P")), (90, 60)),
        ("palette+transparency", png(RGB.convert("P"), transparency=0), (90, 60)),
        ("alpha", png(RGB.convert("RGBA")), (90, 60)),
        ("grey+alpha", png(RGB.convert("LA")), (90, 60)),
        ("cmyk", encode(RGB.convert("CMYK"), "JPEG"), (90, 60)),
        ("exif-rotated", exif_rotated(), (40, 80)),
        ("animated", animated_gif(), (30, 30)),
        ("tiny", png(Image.new("RGB", (1, 1), (9, 9, 9))), (1, 1)),
        ("elongated", png(Image.new("RGB", (1000, 3), (90, 9, 9))), (1000, 3)),
        ("tall", png(Image.new("L", (2, 900), 128)), (2, 900)),
        ("bmp", encode(RGB, "BMP"), (90, 60)),
        ("webp", encode(RGB, "WEBP"), (90, 60)),
        ("tiff", encode(RGB, "TIFF"), (90, 60)),
        ("1-bit", png(RGB.convert("1")), (90, 60)),
    ],
)
def test_unusual_valid_images(client, name, data, size):
    r = post(client, data, "application/octet-stream")
    assert r.status_code == 200, (name, r.text)
    body = r.json()
    assert (body["image"]["width"], body["image"]["height"]) == size
    overlay = client.get(body["attention_urls"]["combined"])
    assert overlay.status_code == 200
    assert Image.open(io.BytesIO(overlay.content)).size == size


def test_alpha_is_composited_on_the_background(model_path):
    from service.decode import decode

    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert decode(png(clear), 100, (0, 0, 255)).image.getpixel((0, 0)) == (0, 0, 255)
    half = Image.new("LA", (4, 4), (0, 255))
    assert decode(png(half), 100, (0, 0, 255)).image.getpixel((0, 0)) == (0, 0, 0)


def test_16_bit_keeps_its_range():
    from service.decode import decode

    wide = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert decode(png(wide), 100).image.getpixel((0, 0)) == (255, 255, 255)


def test_bad_requests_do_not_disturb_good_ones(client):
    good = png(RGB)
    expected = post(client, good).json()["top_k"]
    for bad in (b"", b"junk", png(RGB)[:100]):
        assert post(client, bad).status_code in (415, 422)
        assert post(client, good).json()["top_k"] == expected


def with_text(image: bytes, chunks: int, size: int = 1_000_000) -> bytes:
    """`image` (a PNG) with that many zTXt chunks of `size` zeros each (about 1 KB a megabyte compressed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    text = zlib.compress(bytes(size), 9)
    at = image.index(b"IDAT") - 4
    return image[:at] + b"".join(chunk(b"zTXt", b"k%d\0\0" % i + text) for i in range(chunks)) + image[at:]


def test_png_text_chunks_are_bounded(client):
    """Pillow inflates a PNG's text chunks as it reads the header, up to 64 MB of them (0.16 s of a core
    from 63 KB); the service allows 4 MiB, far above what editors write."""
    small = png(Image.new("RGB", (64, 64), (10, 200, 30)))
    ok = client.post("/v1/predict", content=with_text(small, 2), headers={"content-type": "image/png"})
    assert ok.status_code == 200, ok.text
    bomb = with_text(small, 60)
    assert len(bomb) < 70_000
    r = client.post("/v1/predict", content=bomb, headers={"content-type": "image/png"})
    assert r.status_code == 413 and r.json()["code"] == "image_too_large" and "text chunks" in r.json()["error"]
    r = client.post("/v1/predict", content=with_text(small, 1, 2**21), headers={"content-type": "image/png"})
    assert r.status_code == 413 and "text chunks" in r.json()["error"]  # Pillow's 1 MB a chunk, checked alike


def with_scans(jpeg: bytes, extra: int) -> bytes:
    """A progressive JPEG with its last scan repeated `extra` more times (26 bytes each, here)."""
    last, end = jpeg.rindex(b"\xff\xda"), jpeg.rindex(b"\xff\xd9")
    return jpeg[:end] + jpeg[last:end] * extra + jpeg[end:]


def test_jpeg_scans_are_bounded(client):
    """libjpeg decodes every scan over the whole image at any DCT scale: a 12-megapixel JPEG with one scan
    repeated 1,000 times (97 KB) took 4 s of a core."""
    progressive = encode(Image.new("RGB", (400, 300), (120, 130, 140)), "JPEG", progressive=True)
    assert progressive.count(b"\xff\xda") == 10  # libjpeg's progressive default
    for data, status in ((with_scans(progressive, 54), 200), (with_scans(progressive, 55), 413)):
        r = client.post("/v1/predict", content=data, headers={"content-type": "image/jpeg"})
        assert r.status_code == status, r.text[:300]
    assert "65 scans, more than the limit of 64" in r.json()["error"] and r.json()["code"] == "image_too_large"


def jpeg_in_tiff(jpeg: bytes, width: int, height: int) -> bytes:
    """A little-endian RGB TIFF of one strip holding `jpeg` whole (compression 7, as libtiff reads it)."""
    tags = [  # (tag, type, count, value); 3: SHORT, 4: LONG
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 3, 8 + 2 + 12 * 10 + 4),  # BitsPerSample: 8, 8, 8, just after the directory
        (259, 3, 1, 7),
        (262, 3, 1, 2),
        (273, 4, 1, 8 + 2 + 12 * 10 + 4 + 6),  # the strip, after those
        (277, 3, 1, 3),
        (278, 4, 1, height),
        (279, 4, 1, len(jpeg)),
        (284, 3, 1, 1),
    ]
    directory = b"".join(struct.pack("<HHII" if t == 4 or n > 1 else "<HHIHxx", tag, t, n, v) for tag, t, n, v in tags)
    return b"II*\0" + struct.pack("<IH", 8, len(tags)) + directory + bytes(4) + struct.pack("<3H", 8, 8, 8) + jpeg


def test_jpeg_scans_inside_a_tiff_are_bounded_alike(client):
    """libtiff decodes a JPEG-compressed strip with libjpeg, scan by scan; it stops at 100 scans of its own
    accord (0.46 s of a core for a 146 KB 4000x3000 TIFF), and the service sets it to the JPEG's 64."""
    progressive = encode(Image.new("RGB", (64, 48), (120, 130, 140)), "JPEG", progressive=True, subsampling=0)
    for data, status in ((with_scans(progressive, 54), 200), (with_scans(progressive, 55), 422)):
        tiff = jpeg_in_tiff(data, 64, 48)
        assert Image.open(io.BytesIO(tiff)).info["compression"] == "jpeg"
        r = client.post("/v1/predict", content=tiff, headers={"content-type": "image/tiff"})
        assert r.status_code == status, r.text[:300]
    assert r.json()["code"] == "invalid_image" and "TIFF" in r.json()["error"]
