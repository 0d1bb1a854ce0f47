"""Overlay maths: maps sum to 1, cropping and scaling keep attention on the right pixels."""

import io
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from service import overlay
from service.preprocess import letterbox_box, to_input
from service.store import MemoryStore


def test_maps_are_upsampled_cropped_and_scaled():
    grid = np.zeros((4, 4), np.float32)
    grid[3, 0] = 1  # bottom-left cell of a layer's grid
    heat = np.asarray(overlay.to_image_grid(grid, (16, 16), (0, 0, 16, 16), 32, 32))
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert heat.shape == (32, 32) and x < 8 and y >= 24
    # letterboxed: the image fills rows 4..12 of the input, so that box is what is scaled to the image
    band = overlay.to_image_grid(grid, (16, 16), (0, 4, 16, 12), 64, 32)
    assert band.size == (64, 32)


def test_letterbox_geometry_maps_back_to_the_image():
    img = Image.new("RGB", (640, 400), (0, 0, 0))
    img.paste((255, 255, 255), (500, 300, 540, 340))  # a bright square near the bottom right
    x, geo = to_input(img, (48, 48), "letterbox")
    assert geo.content == letterbox_box(640, 400, (48, 48), "letterbox") == (0, 9, 48, 39)
    grid = x.mean(0)  # use the input itself as the "attention map"
    back = np.asarray(overlay.to_image_grid(grid, (48, 48), geo.content, 640, 400))
    y, xx = np.unravel_index(back.argmax(), back.shape)
    assert 490 <= xx <= 550 and 290 <= y <= 350
    _, stretched = to_input(img, (48, 48), "stretch")
    assert stretched.content == (0, 0, 48, 48)


def test_render_png_and_colormaps():
    m = Image.fromarray(np.linspace(0, 255, 200 * 100).reshape(100, 200).astype(np.uint8), "L")
    photo = Image.new("RGB", (200, 100), (255, 0, 0))
    a = Image.open(io.BytesIO(overlay.render(m, photo, "viridis", 0.5)))
    b = Image.open(io.BytesIO(overlay.render(m, None, "jet", 0.5)))
    assert a.size == b.size == (200, 100) and a.format == "PNG"
    assert overlay.output_size(640, 400, 320) == (320, 200) and overlay.output_size(10, 10, 320) == (10, 10)
    flat = np.asarray(overlay.colorize(Image.fromarray(overlay.levels(np.ones((3, 3)))), "turbo").convert("RGB"))
    assert (flat == flat[0, 0]).all()


def pillow_resize(a: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a.astype(np.float32), "F").resize((width, height), Image.BILINEAR))


def test_resampling_matrices_are_pillows_bilinear_resize():
    for n in (1, 2, 5, 12, 39, 48, 224):
        for m in (1, 3, 16, 20, 48, 400, 512, 1024):
            impulses = np.eye(n, dtype=np.float32)
            np.testing.assert_allclose(overlay.resampling(n, m), pillow_resize(impulses, m, n), atol=1e-6)


def test_maps_scale_as_pillow_scales_them_in_floats():
    """Upsampled to the input, cropped, scaled and then normalized, as Pillow's float resizes would: the
    levels are within rounding (1 of 255) of that, enlarging and shrinking, cached sizes and others."""
    rng = np.random.default_rng(0)
    peaked = np.zeros((12, 12), np.float32)
    peaked[3, 8] = 1
    for grid in (rng.random((12, 12), dtype=np.float32), rng.random((48, 48), dtype=np.float32) ** 4, peaked):
        for content, (w, h) in (
            ((0, 0, 48, 48), (512, 512)),
            ((0, 9, 48, 39), (640, 400)),
            ((0, 0, 48, 48), (20, 20)),
            ((0, 0, 48, 48), (16, 16)),
            ((5, 0, 43, 48), (7, 2000)),
        ):
            x0, y0, x1, y1 = content
            floats = pillow_resize(pillow_resize(grid, 48, 48)[y0:y1, x0:x1], w, h)
            lo, hi = floats.min(), floats.max()
            reference = (floats - lo) / (hi - lo) * 255
            for _ in range(2):  # made, then from the cache where it is cached
                got = np.asarray(overlay.to_image_grid(grid, (48, 48), content, w, h)).astype(np.float64)
                assert got.shape == (h, w) and np.abs(got - reference).max() <= 1


def test_every_png_level_writes_the_same_pixels():
    """Level 1 (fpng on x86-64) and the zlib levels differ in speed and size, never in pixels."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    fast = overlay.encode(photo, "png", overlay.Encoding(png_compress_level=1))
    for level in (0, 6, 9):
        other = overlay.encode(photo, "png", overlay.Encoding(png_compress_level=level))
        assert other != fast
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(other))), np.asarray(photo))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(fast))), np.asarray(photo))
    if platform.machine() == "x86_64":
        assert overlay.fpng_ext is not None, "fpng is a dependency on x86-64"


def test_memory_store_bounds_count_and_age():
    import asyncio

    async def main():
        now = [0.0]
        store = MemoryStore(max_items=2, ttl_s=10, clock=lambda: now[0])
        for k in "abc":
            await store.put(k, k)
        assert await store.get("a") is None and await store.get("b") == "b" and len(store) == 2
        now[0] = 11
        assert await store.get("c") is None

    asyncio.run(main())


def test_a_worker_renders_its_matrix_products_on_one_thread(model_path):
    """OpenBLAS would run each of `to_image_grid`'s products on a thread per core, spinning on cores the
    other requests need. In a process of its own: threadpoolctl lets only the first thread that sets a
    limit set one."""
    code = (
        "import sys; from threadpoolctl import threadpool_info as info; from fastapi.testclient import TestClient\n"
        "from service.config import Settings; from service.main import create_app\n"
        "blas = lambda: {p['num_threads'] for p in info() if p['user_api'] == 'blas'}\n"
        "print(blas())\n"
        "with TestClient(create_app(Settings(MODEL_PATH=sys.argv[1]))): print(blas())\n"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", code, str(model_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    before, after = done.stdout.split()
    if before == "{1}":  # OpenBLAS takes no more threads than there are cores
        pytest.skip("one core: OpenBLAS runs on one thread anyway")
    assert (before, after) == ("{2}", "{1}")
