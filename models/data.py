"""Datasets: the built-in cluttered-digits benchmark, CIFAR-10/100 and ImageFolder.

Every dataset yields (image, label, box): image is float32 RGB in [0, 1], (3, H, W); box is
the digit's ground-truth box (x0, y0, x1, y1) in pixels, exclusive end, or (-1, -1, -1, -1)
where the dataset has none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

NO_BOX = (-1, -1, -1, -1)
log = logging.getLogger("models.data")


class DatasetError(RuntimeError):
    """A dataset cannot be loaded as asked; the message says what to do."""


@dataclass(frozen=True)
class ClutterSpec:
    """How cluttered-digits canvases are drawn."""

    canvas: int = 48  # side of the square RGB canvas
    digit_min: int = 12  # digit side range, in pixels (at most a third of the canvas)
    digit_max: int = 16
    fragments: tuple[int, int] = (3, 6)  # range of clutter fragments per canvas
    max_overlap: float = 0.15  # largest share of the digit's square a fragment may cover
    noise: float = 0.08  # std of the background's Gaussian noise (the most, when noise_min is set)
    noise_min: float | None = None  # when set, each canvas draws its noise std from [noise_min, noise]
    inverted: float = 0.0  # share of canvases drawn as dark ink on a light background
    empty: float = 0.0  # canvases holding clutter only, as a share of the digits; their class is "none"
    scenes: float = 0.0  # share of canvases drawn on a scene-like background (smooth colour fields and shapes)
    blobs: float = 0.0  # share of canvases with 1-2 solid shaded shapes as bright as ink (objects that are not strokes)
    test_fraction: float = 0.2  # of source scans held out
    train_per_scan: int = 8  # canvases drawn from each source scan
    test_per_scan: int = 3


# The rendering the robust default model trains on: digits 0.21-0.46 of the canvas, 1-8 fragments,
# noise 0.02-0.16, a third of canvases inverted, a third on scene-like backgrounds, a quarter with
# solid shapes as bright as ink, and three clutter-only canvases per twenty digits.
ROBUST = ClutterSpec(
    digit_min=10,
    digit_max=22,
    fragments=(1, 8),
    noise=0.16,
    noise_min=0.02,
    inverted=0.33,
    empty=0.15,
    scenes=0.33,
    blobs=0.25,
)
NONE_CLASS = "none"


def _scans() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)  # (1797, 8, 8)


def split_scans(n: int, seed: int, test_fraction: float) -> dict[str, np.ndarray]:
    """Indices of source scans for each split; disjoint by construction."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return {"test": np.sort(order[:n_test]), "train": np.sort(order[n_test:])}


def _resize(a: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a, mode="F").resize((w, h), Image.BILINEAR)).clip(0, 1)


def _fragment(scan: np.ndarray, rng: np.random.Generator, side: int) -> np.ndarray:
    """Half of a scan, stretched to a digit's size and turned on its side.

    Same scale and ink density as a digit, but never a whole upright digit, so the label
    stays unambiguous (an upright stretched top half of an 8 would read as a 0).
    """
    half = [scan[:4], scan[4:], scan[:, :4], scan[:, 4:]][rng.integers(4)]
    return np.rot90(_resize(half, side, side), k=1 + 2 * int(rng.integers(2))).copy()


def _place(rng: np.random.Generator, canvas: int, side: int) -> tuple[int, int]:
    return int(rng.integers(0, canvas - side + 1)), int(rng.integers(0, canvas - side + 1))


def _beside(
    rng: np.random.Generator, canvas: int, h: int, w: int, digit: tuple[int, int, int], limit: float
) -> tuple[int, int] | None:
    """A place for an h x w stamp that covers at most `limit` pixels of the digit's square (x, y, side),
    or None after 20 tries: it may touch the digit but not hide it."""
    x, y, side = digit
    for _ in range(20):
        bx, by = int(rng.integers(0, canvas - w + 1)), int(rng.integers(0, canvas - h + 1))
        if max(0, min(bx + w, x + side) - max(bx, x)) * max(0, min(by + h, y + side) - max(by, y)) <= limit:
            return bx, by
    return None


def _scene(rng: np.random.Generator, c: int) -> np.ndarray:
    """A (c, c, 3) background that is not flat: a smooth random colour field with a few solid shapes.

    Digits and "none" canvases both get these, so a textured image says nothing about the class.
    Kept below the ink's brightness (0.45-1.0) so a digit stays visible on it.
    """
    g = int(rng.integers(2, 7))
    grid = rng.uniform(0.0, 0.4, size=(g, g, 3)).astype(np.float32)
    field = np.stack([_resize(np.ascontiguousarray(grid[..., i]), c, c) for i in range(3)], axis=-1)
    yy, xx = np.mgrid[:c, :c]
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.integers(0, c, size=2)
        rx, ry = rng.integers(3, c // 2, size=2)
        shape = (
            ((xx - x0) / rx) ** 2 + ((yy - y0) / ry) ** 2 <= 1
            if rng.random() < 0.5
            else ((abs(xx - x0) <= rx) & (abs(yy - y0) <= ry))
        )
        field[shape] = rng.uniform(0.0, 0.4, size=3)
    return field


def _blob(rng: np.random.Generator, c: int) -> tuple[np.ndarray, np.ndarray]:
    """A solid, shaded shape (disc, ellipse or box) up to half the canvas: its alpha (h, w) and colour (h, w, 3).

    Photos are full of filled objects as bright as ink (a flower, a ball, a face); digits are strokes.
    Shaded from its centre, darker or lighter, so it is not one flat colour.
    """
    h, w = (int(v) for v in rng.integers(8, c // 2 + 1, size=2))
    yy, xx = np.mgrid[:h, :w]
    d = np.sqrt(((xx + 0.5) / w * 2 - 1) ** 2 + ((yy + 0.5) / h * 2 - 1) ** 2)  # 0 at the centre, 1 at the rim
    alpha = np.ones((h, w), np.float32) if rng.random() < 0.3 else np.clip((1 - d) * min(h, w) / 3, 0, 1)
    shade = 0.6 + 0.4 * (d if rng.random() < 0.5 else 1 - d.clip(0, 1))
    colour = rng.uniform(0.45, 1.0, size=3).astype(np.float32) * shade[..., None].astype(np.float32)
    return alpha.astype(np.float32), colour.clip(0, 1)


def draw_canvas(
    scan: np.ndarray | None, others: np.ndarray, rng: np.random.Generator, spec: ClutterSpec
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One (canvas, canvas, 3) float image with `scan` somewhere in clutter, and the digit's box
    (`scan` None: clutter only, and NO_BOX)."""
    c = spec.canvas
    side = int(rng.integers(spec.digit_min, spec.digit_max + 1))
    ink = np.zeros((c, c), np.float32)
    colour = np.zeros((c, c, 3), np.float32)
    palette = rng.uniform(0.45, 1.0, size=(spec.fragments[1] + 1, 3)).astype(np.float32)

    def stamp(alpha: np.ndarray, x: int, y: int, rgb: np.ndarray) -> None:
        region = (slice(y, y + alpha.shape[0]), slice(x, x + alpha.shape[1]))
        on_top = alpha > ink[region]
        ink[region] = np.where(on_top, alpha, ink[region])
        colour[region] = np.where(on_top[..., None], rgb, colour[region])

    x, y = _place(rng, c, side)
    for i in range(int(rng.integers(spec.fragments[0], spec.fragments[1] + 1))):
        frag = _fragment(others[rng.integers(len(others))], rng, side)
        if (at := _beside(rng, c, side, side, (x, y, side), spec.max_overlap * side * side)) is not None:
            stamp(frag, *at, palette[i + 1])
    if spec.blobs and rng.random() < spec.blobs:
        limit = spec.max_overlap * side * side if scan is not None else np.inf
        for _ in range(int(rng.integers(1, 3))):
            alpha, shaded = _blob(rng, c)
            if (at := _beside(rng, c, *alpha.shape, (x, y, side), limit)) is not None:
                stamp(alpha, *at, shaded)
    box = NO_BOX
    if scan is not None:
        digit = _resize(scan, side, side)
        region = (slice(y, y + side), slice(x, x + side))
        ink[region] = np.maximum(ink[region] * (digit < 0.05), digit)
        colour[region] = np.where((digit >= 0.05)[..., None], palette[0], colour[region])
        ys, xs = np.nonzero(digit >= 0.05)
        box = (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1)

    background = rng.uniform(0.0, 0.35, size=3).astype(np.float32)
    if spec.scenes and rng.random() < spec.scenes:
        background = _scene(rng, c)
    if spec.inverted and rng.random() < spec.inverted:  # dark ink on a light background
        background, colour = 1 - background, (1 - colour) * 0.6
    img = background * (1 - ink[..., None]) + colour * ink[..., None]
    noise = spec.noise if spec.noise_min is None else rng.uniform(spec.noise_min, spec.noise)
    img += rng.normal(0, noise, size=img.shape).astype(np.float32)
    return img.clip(0, 1), box


def clutter_only(count: int, seed: int = 0, spec: ClutterSpec = ClutterSpec()) -> torch.Tensor:
    """`count` canvases of clutter cut from the test split's scans, with no digit: (N, 3, H, W)."""
    scans, _ = _scans()
    pool = scans[split_scans(len(scans), seed, spec.test_fraction)["test"]]
    rng = np.random.default_rng([seed, 2])  # a stream of its own: the splits use 0 and 1
    canvases = [draw_canvas(None, pool, rng, spec)[0] for _ in range(count)]
    return torch.from_numpy(np.stack(canvases)).permute(0, 3, 1, 2).contiguous()


class ClutteredDigits(Dataset):
    """Handwritten digits from scikit-learn, each placed at random on a cluttered RGB canvas.

    Deterministic for a seed. Train and test use disjoint source scans, and the clutter of a
    split is cut only from that split's scans.
    """

    def __init__(
        self, split: str = "train", seed: int = 0, spec: ClutterSpec = ClutterSpec(), none_class: bool = False
    ) -> None:
        """`none_class`: an 11th class, "none", for canvases without a digit (drawn when `spec.empty` > 0)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if spec.empty and not none_class:
            raise ValueError("clutter-only canvases (spec.empty > 0) need none_class=True")
        self.spec = spec
        self.classes = [str(i) for i in range(10)] + ([NONE_CLASS] if none_class else [])
        scans, labels = _scans()
        self.scan_ids = split_scans(len(scans), seed, spec.test_fraction)[split]
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        pool = scans[self.scan_ids]
        images, targets, boxes, sources = [], [], [], []
        for _ in range(spec.train_per_scan if split == "train" else spec.test_per_scan):
            for sid in self.scan_ids:
                img, box = draw_canvas(scans[sid], pool, rng, spec)
                images.append(img)
                targets.append(labels[sid])
                boxes.append(box)
                sources.append(sid)
        for _ in range(round(len(targets) * spec.empty)):
            img, box = draw_canvas(None, pool, rng, spec)
            images.append(img)
            targets.append(self.classes.index(NONE_CLASS))
            boxes.append(box)
            sources.append(-1)
        self.images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
        self.targets = torch.tensor(targets)
        self.boxes = torch.tensor(boxes)
        self.sources = np.array(sources)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        return self.images[i], int(self.targets[i]), self.boxes[i]


class _WithoutBoxes(Dataset):
    def __init__(self, inner: Dataset, classes: list[str]) -> None:
        self.inner = inner
        self.classes = classes

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        img, label = self.inner[i]
        return img, int(label), torch.tensor(NO_BOX)


def rgb_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # what Pillow raises for a damaged file
        raise DatasetError(f"cannot decode {path} ({e}): remove or replace it") from e


class _ReadableImages:
    """ImageFolder's file filter: image extensions whose header Pillow can read. A damaged file is left out
    and named, so that one bad photo among thousands costs a warning, not a crash mid-epoch."""

    def __init__(self) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

        # ImageFolder's own extension check, which a filter of one's own replaces
        self.is_image_name = partial(has_file_allowed_extension, extensions=IMG_EXTENSIONS)
        self.unreadable: list[tuple[str, str]] = []

    def __call__(self, path: str) -> bool:
        if not self.is_image_name(path):
            return False
        try:
            with Image.open(path):  # the header only: about 50 us a file
                return True
        except (OSError, SyntaxError, ValueError) as e:
            self.unreadable.append((path, str(e) or type(e).__name__))
            return False

    def report(self, folder: Path) -> None:
        if self.unreadable:
            named = "; ".join(f"{p} ({why})" for p, why in self.unreadable[:5])
            more = f" and {len(self.unreadable) - 5} more" if len(self.unreadable) > 5 else ""
            log.warning("left out %d unreadable image(s) under %s: %s%s", len(self.unreadable), folder, named, more)


def build_dataset(
    name: str,
    split: str,
    *,
    root: str | Path = "data",
    seed: int = 0,
    download: bool = False,
    input_size: tuple[int, int] = (32, 32),
    augment: bool = False,
    clutter: ClutterSpec = ClutterSpec(),
    none_class: bool = False,
) -> Dataset:
    """Build a dataset by name: cluttered-digits, cifar10, cifar100 or imagefolder (at `root`)."""
    if name == "cluttered-digits":
        return ClutteredDigits(split, seed, clutter, none_class)

    from torchvision import datasets, transforms

    train = split == "train"
    if name in ("cifar10", "cifar100"):
        aug = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
        tf = transforms.Compose([*aug, transforms.ToTensor()])
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        try:
            ds = cls(str(root), train=train, download=download, transform=tf)
        except RuntimeError as e:
            raise DatasetError(
                f"{name} is not under {root!s}: pass --download to fetch it (needs internet), "
                f"or --data-root to point at an existing copy ({e})"
            ) from e
        return _WithoutBoxes(ds, list(ds.classes))
    if name == "imagefolder":
        folder = Path(root) / ("train" if train else "val")
        if not folder.is_dir():
            raise DatasetError(
                f"imagefolder expects {folder} (ImageFolder layout: <root>/train/<class>/*.jpg and <root>/val/...)"
            )
        h, w = input_size
        aug = (
            [transforms.RandomResizedCrop((h, w), scale=(0.25, 1.0)), transforms.RandomHorizontalFlip()]
            if augment  # ImageNet's fine-tuning recipe, at the model's input size
            else [transforms.Resize(round(min(h, w) * 8 / 7)), transforms.CenterCrop((h, w))]  # 256 -> 224
        )
        readable = _ReadableImages()
        tf = transforms.Compose([*aug, transforms.ToTensor()])
        try:
            ds = datasets.ImageFolder(str(folder), transform=tf, loader=rgb_image, is_valid_file=readable)
        except FileNotFoundError as e:  # a class folder with no image left
            raise DatasetError(f"{e} ({len(readable.unreadable)} unreadable image(s) left out)") from e
        finally:
            readable.report(folder)
        return _WithoutBoxes(ds, list(ds.classes))
    raise DatasetError(f"unknown dataset {name!r}: choose cluttered-digits, cifar10, cifar100 or imagefolder")
