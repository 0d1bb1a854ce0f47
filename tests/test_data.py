import numpy as np
import pytest
import torch

from models.data import ClutteredDigits, ClutterSpec, DatasetError, build_dataset, split_scans

SMALL = ClutterSpec(train_per_scan=1, test_per_scan=1)


@pytest.fixture(scope="module")
def test_split():
    return ClutteredDigits("test", seed=3, spec=SMALL)


def test_deterministic_for_a_seed(test_split):
    again = ClutteredDigits("test", seed=3, spec=SMALL)
    assert torch.equal(test_split.images, again.images)
    assert torch.equal(test_split.boxes, again.boxes)
    other = ClutteredDigits("test", seed=4, spec=SMALL)
    assert not torch.equal(test_split.images[:10], other.images[:10])


def test_images_and_boxes(test_split):
    img, label, box = test_split[0]
    assert img.shape == (3, 48, 48) and img.dtype == torch.float32
    assert 0 <= img.min() and img.max() <= 1
    assert 0 <= label <= 9
    b = test_split.boxes
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 2] <= 48).all() and (b[:, 3] <= 48).all()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    assert (w >= 3).all() and (h >= 3).all() and (w <= SMALL.digit_max).all() and (h <= SMALL.digit_max).all()


def test_box_surrounds_the_digit():
    from models.data import _resize, _scans, draw_canvas

    scans, _ = _scans()
    rng = np.random.default_rng(0)
    no_clutter = ClutterSpec(fragments=(0, 0), noise=0.0)
    img, (x0, y0, x1, y1) = draw_canvas(scans[5], scans[:1], rng, no_clutter)
    grey = img.mean(-1)
    inside = np.zeros_like(grey, bool)
    inside[y0:y1, x0:x1] = True
    # With no clutter and no noise, the background is flat: all ink lies inside the box.
    background = np.median(grey[~inside])
    assert np.abs(grey[~inside] - background).max() < 1e-5
    assert np.abs(grey[inside] - background).max() > 0.2
    assert _resize(scans[5], 12, 12).shape == (12, 12)


def test_no_scan_is_shared_between_splits(test_split):
    train = ClutteredDigits("train", seed=3, spec=SMALL)
    assert not set(train.scan_ids) & set(test_split.scan_ids)
    assert not set(train.sources) & set(test_split.sources)
    s = split_scans(1797, 3, 0.2)
    assert len(s["train"]) + len(s["test"]) == 1797


def test_missing_datasets_say_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match="--download"):
        build_dataset("cifar10", "test", root=tmp_path)
    with pytest.raises(DatasetError, match="ImageFolder"):
        build_dataset("imagefolder", "train", root=tmp_path)


def test_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / split / cls / "a.png")
    ds = build_dataset("imagefolder", "val", root=tmp_path, input_size=(24, 24))
    img, label, box = ds[1]
    assert ds.classes == ["cat", "dog"] and label == 1
    assert img.shape == (3, 24, 24) and box.tolist() == [-1, -1, -1, -1]


def test_imagefolder_leaves_out_damaged_images_and_names_them(tmp_path, caplog):
    import io
    import logging

    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "train" / cls / f"{i}.png")
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image, and not an image's name")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    (tmp_path / "train" / "dog" / "cut.png").write_bytes(buf.getvalue()[:90])  # a sound header, pixels cut off
    with caplog.at_level(logging.WARNING, logger="models.data"):
        ds = build_dataset("imagefolder", "train", root=tmp_path, input_size=(24, 24))
    assert len(ds) == 5  # the broken header is left out, and said so; the text file was never an image
    assert [r.getMessage() for r in caplog.records] == [
        f"left out 1 unreadable image(s) under {tmp_path / 'train'}: {tmp_path / 'train/cat/broken.jpg'} "
        "(Truncated File Read)"
    ]
    cut = [i for i, (path, _) in enumerate(ds.inner.samples) if path.endswith("cut.png")][0]
    with pytest.raises(DatasetError, match=r"cannot decode .*cut\.png .*remove or replace it"):
        ds[cut]  # found only when its pixels are read: named, not a bare Pillow error
    for f in (tmp_path / "train" / "dog").glob("*.png"):
        f.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DatasetError, match=r"dog.*4 unreadable image\(s\) left out"):
        build_dataset("imagefolder", "train", root=tmp_path, input_size=(24, 24))


def test_robust_rendering_adds_inverted_canvases_and_a_none_class():
    from dataclasses import replace

    from models.data import NO_BOX, ROBUST

    ds = ClutteredDigits("test", seed=3, spec=replace(ROBUST, test_per_scan=1), none_class=True)
    assert ds.classes[-1] == "none" and len(ds.classes) == 11
    empty = ds.targets == 10
    assert int(empty.sum()) == round(ROBUST.empty * int((~empty).sum()))
    assert (ds.boxes[empty] == torch.tensor(NO_BOX)).all() and (ds.boxes[~empty, 0] >= 0).all()
    sides = (ds.boxes[~empty, 2:] - ds.boxes[~empty, :2]).max(1).values
    assert sides.max() > 16  # digits larger than the standard rendering's 12-16 px
    # dark ink on a light background: about a third of the canvases are mostly light
    light = ds.images.mean(dim=(1, 2, 3)) > 0.5
    assert 0.2 < float(light.float().mean()) < 0.45
    inverted = ClutteredDigits("test", seed=3, spec=ClutterSpec(test_per_scan=1, inverted=1.0))
    assert float(inverted.images.mean()) > 0.5 > float(ClutteredDigits("test", 3, SMALL).images.mean())
    with pytest.raises(ValueError, match="none_class"):
        ClutteredDigits("test", seed=3, spec=replace(ROBUST, test_per_scan=1))


def test_scene_backgrounds_are_not_flat():
    """With no clutter and no noise, a plain canvas's background is one colour; a scene's varies."""
    spec = ClutterSpec(test_per_scan=1, fragments=(0, 0), noise=0.0)
    for scenes, varies in ((0.0, False), (1.0, True)):
        ds = ClutteredDigits("test", seed=3, spec=ClutterSpec(**{**spec.__dict__, "scenes": scenes}))
        spreads = []
        for img, (x0, y0, x1, y1) in zip(ds.images[:50], ds.boxes[:50].tolist()):
            outside = torch.ones(img.shape[1:], dtype=torch.bool)
            outside[y0:y1, x0:x1] = False
            spreads.append(float(img[:, outside].std(dim=1).max()))
        assert (min(spreads) > 0.03) if varies else (max(spreads) < 0.01)  # faint ink lies outside the box


def test_blobs_are_solid_shapes_beside_the_digit():
    """With no clutter and no noise, whatever differs from the flat background outside the digit's box is
    a blob: none without them, and with them at least one per canvas, larger than a stroke's width."""
    spec = ClutterSpec(test_per_scan=1, fragments=(0, 0), noise=0.0)
    for blobs in (0.0, 1.0):
        ds = ClutteredDigits("test", seed=3, spec=ClutterSpec(**{**spec.__dict__, "blobs": blobs}))
        for img, (x0, y0, x1, y1) in zip(ds.images[:50], ds.boxes[:50].tolist()):
            grey = img.mean(0)
            outside = torch.ones_like(grey, dtype=torch.bool)
            outside[y0:y1, x0:x1] = False
            background = grey[outside].median()
            marked = int(((grey - background).abs() > 0.1)[outside].sum())
            assert marked >= 32 if blobs else marked == 0
