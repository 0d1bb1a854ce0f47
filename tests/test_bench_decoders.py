"""bench.decoders: the decoders it times against Pillow's must decode the same pixels, or its table says nothing."""

import pytest

from bench import decoders
from service.config import Settings
from service.pipeline import need_for


@pytest.mark.parametrize("name", ["640x480 JPEG", "4000x3000 JPEG", "digit.png (640x400 PNG)"])
def test_each_candidate_decodes_the_pixels_the_service_decodes(name):
    data = decoders.inputs()[name]
    settings = Settings()
    for side in (0, settings.STORE_IMAGE_MAX_SIZE):
        r = decoders.measure(name, data, need_for(side, (48, 48), settings), seconds=0.02, rounds=1)
        assert r["pillow_ms"] > 0 and r["other_ms"] > 0
        if name.endswith("JPEG") and side == 0:  # for the model: at a reduced scale, not at full size
            assert int(r["decoded"].split("x")[0]) < int(name.split("x")[0])


def test_a_candidate_that_decodes_other_pixels_is_refused(monkeypatch):
    data = decoders.inputs()["640x480 JPEG"]
    need = need_for(0, (48, 48), Settings())
    monkeypatch.setattr(decoders, "candidate", lambda data, size: lambda: decoders.pillow(data, need).reduce(2))
    with pytest.raises(AssertionError, match="other pixels"):
        decoders.measure("640x480 JPEG", data, need, seconds=0.02, rounds=1)


def test_the_resize_is_a_small_share_of_preparing_an_input():
    data = decoders.inputs()["4000x3000 JPEG"]
    assert 0 < decoders.resize_share(data, (48, 48), Settings(), seconds=0.05) < 0.5


def test_the_inflate_bound_reads_the_pngs_pixel_data():
    png = decoders.inputs()["digit.png (640x400 PNG)"]
    assert len(decoders.idat(png)) > len(png) * 0.9  # a photo-like PNG is almost all pixel data
    r = decoders.inflate(png, seconds=0.02, rounds=1)
    assert r["zlib"] > 0 and r["zlib-ng"] > 0
