"""Bytes -> image: JPEGs decode at reduced scale only as far as the model and the overlays allow."""

import io
from importlib.resources import files

import numpy as np
import pytest
from PIL import Image

from service.decode import Need, decode, draft_size
from service.preprocess import to_input
from tests.serving.conftest import encode, make_client


@pytest.fixture(scope="module")
def china() -> bytes:
    """A real 640x427 photo that ships with scikit-learn."""
    return (files("sklearn.datasets") / "images" / "china.jpg").read_bytes()


def big_jpeg(photo: bytes, size=(4000, 3000)) -> bytes:
    return encode(Image.open(io.BytesIO(photo)).convert("RGB").resize(size, Image.BICUBIC), "JPEG", quality=90)


def test_draft_size_keeps_what_is_needed():
    assert draft_size(4000, 3000, Need(1024)) == (1024, 768)
    assert draft_size(4000, 3000, Need(48, 48)) == (64, 48)
    assert draft_size(300, 200, Need(1024)) == (300, 200)  # never above the original


def test_reduced_scale_decode_covers_the_need_and_reports_the_original_size(china):
    data = big_jpeg(china)
    full = decode(data, 40_000_000)
    for need in (Need(1024), Need(48, 0), Need(48, 48)):
        d = decode(data, 40_000_000, need=need)
        assert (d.width, d.height) == (4000, 3000)
        assert max(d.image.size) >= need.longest and min(d.image.size) >= need.shortest
        assert d.image.width < 4000  # libjpeg scaled it
    assert decode(data, 40_000_000, need=Need(48)).image.size == (500, 375)  # 1/8 scale
    assert full.image.size == (4000, 3000)


def test_reduced_scale_barely_changes_the_model_input(china):
    data = big_jpeg(china)
    full = decode(data, 40_000_000)
    small = decode(data, 40_000_000, need=Need(1024))
    a, geo_a = to_input(full.image, (48, 48))
    b, geo_b = to_input(small.image, (48, 48), original_size=(small.width, small.height))
    assert geo_a == geo_b
    assert np.abs(a - b).max() < 0.05 and np.abs(a - b).mean() < 0.005


def test_exif_rotation_reports_the_upright_original_size():
    img = Image.new("RGB", (3000, 1000), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    d = decode(encode(img, "JPEG", exif=exif.tobytes()), 40_000_000, need=Need(100))
    assert (d.width, d.height) == (1000, 3000)
    assert d.image.width < d.image.height and d.image.height >= 100


def test_predict_on_a_large_jpeg_reports_and_draws_at_the_right_size(model_path, china):
    data = big_jpeg(china)
    with make_client(model_path, STORE_IMAGE_MAX_SIZE=512) as c:
        r = c.post("/v1/predict", content=data, headers={"content-type": "image/jpeg"})
        assert r.status_code == 200, r.text
        assert r.json()["image"] == {"width": 4000, "height": 3000}
        overlay = c.get(r.json()["attention_urls"]["combined"])
        w, h = Image.open(io.BytesIO(overlay.content)).size
        assert 256 < w <= 512 and abs(w / h - 4 / 3) < 0.01  # at most the store's side, aspect kept
        assert r.json()["timings_ms"]["decode_ms"] > 0


def test_a_truncated_large_jpeg_is_refused_at_any_scale():
    """A JPEG whose header promises 6000x6000 but whose data stops early is a 422, not a grey 200."""
    from service.errors import InvalidImage

    big = Image.new("RGB", (6000, 6000), (120, 30, 60))
    for progressive in (False, True):
        data = encode(big, "JPEG", quality=90, progressive=progressive)
        for cut in (2000, len(data) // 2, len(data) - 50):
            for need in (None, Need(513)):
                with pytest.raises(InvalidImage):
                    decode(data[:cut], 40_000_000, need=need)


def test_an_ico_hiding_a_huge_png_is_refused_before_decoding(tmp_path):
    """The ICO directory says 16x16; the PNG inside is 7000x7000 (49 M pixels, over the 40 M limit)."""
    import struct
    import subprocess
    import sys

    inner = encode(Image.new("RGB", (7000, 7000)), "PNG")
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(inner), 22) + inner
    (tmp_path / "x.ico").write_bytes(ico)
    code = (
        "import resource, sys; from service.decode import decode; from service.errors import ImageTooLarge\n"
        "data = open(sys.argv[1], 'rb').read(); before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    decode(data, 40_000_000)\nexcept ImageTooLarge:\n    print('refused')\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "x.ico")], capture_output=True, text=True, check=True
    )
    refused, grown_mb = out.stdout.split()
    assert refused == "refused" and int(grown_mb) < 50, f"{grown_mb} MB: the inner image was decoded"
