"""Does decoding at the model's scale change the answers? (not a test)

    .venv/bin/python -m bench.scales        # prints a markdown table

`/v1/predict` makes the model's input from the upload decoded at the model's scale: a JPEG at 1/2,
1/4 or 1/8 of its size where that leaves at least twice the input's side, then box-reduced to at most
four times it. Before, the input was made from the image decoded for overlays (longest side above
half of WARN_STORE_IMAGE_MAX_SIZE). Both run here on the same JPEGs, through the default model on the
CPU, and so does the smallest decode (1/8 wherever it leaves the input's side, as a first version did):
- the test split (standard, and inverted: dark ink on light), each 48x48 canvas enlarged 3x and 10x
  (bicubic) and saved as a JPEG at quality 90, as a camera or a scanner would hand it over;
- photos with no digit (scikit-learn's two sample photos, matplotlib's portrait and gift icon, whole
  and as quadrants), as JPEGs at their own size.
Reported: top-1 accuracy of each path (for photos: how often it answers "none"), how often the two
agree, and the largest difference of a probability between them.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from bench.server import ROOT
from service.config import Settings
from service.decode import Need
from service.model import OnnxModel
from service.pipeline import prepare, shrunk
from service.preprocess import to_input


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def digits(inverted: bool, scale: int, limit: int) -> tuple[list[bytes], list[int]]:
    from models.data import ClutteredDigits, ClutterSpec

    data = ClutteredDigits("test", 0, ClutterSpec(inverted=1.0 if inverted else 0.0), none_class=True)
    images, labels = [], []
    for i in range(min(limit, len(data))):
        canvas = Image.fromarray((data.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        images.append(jpeg(canvas.resize((canvas.width * scale, canvas.height * scale), Image.BICUBIC)))
        labels.append(int(data.targets[i]))
    return images, labels


def photos(none: int) -> tuple[list[bytes], list[int]]:
    from models.evaluate import _pictures

    images = []
    for img in _pictures():
        w, h = img.size
        images.append(jpeg(img))
        for box in ((0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h)):
            images.append(jpeg(img.crop(box)))
    return images, [none] * len(images)


def smallest(data: bytes, size: tuple[int, int], settings: Settings) -> np.ndarray:
    """The input made from the smallest decode that still covers the input's side."""
    img, original = shrunk(data, 2 * max(size), settings, Need(max(size)))
    return to_input(img, size, settings.RESIZE, original)[0]


def compare(model: OnnxModel, images: list[bytes], labels: list[int], settings: Settings) -> dict:
    size = model.info.input_size

    def probabilities(make) -> np.ndarray:
        x = np.stack([make(data) for data in images])
        return np.concatenate([model.run(x[i : i + 64])["probabilities"] for i in range(0, len(x), 64)])

    before = probabilities(lambda data: prepare(data, settings.STORE_IMAGE_MAX_SIZE, size, settings)[1])
    now = probabilities(lambda data: prepare(data, 0, size, settings)[1])
    least = probabilities(lambda data: smallest(data, size, settings))
    truth = np.array(labels)
    return {
        "images": len(images),
        "before": float((before.argmax(1) == truth).mean()),
        "now": float((now.argmax(1) == truth).mean()),
        "smallest": float((least.argmax(1) == truth).mean()),
        "agree": float((before.argmax(1) == now.argmax(1)).mean()),
        "max_diff": float(np.abs(before - now).max()),
    }


def main() -> None:
    settings = Settings()
    model = OnnxModel(ROOT / "default_model/model.onnx", "CPUExecutionProvider", 0, settings.cuda_options())
    none = model.info.class_names.index("none")
    rows = {}
    for inverted in (False, True):
        for scale in (3, 10):
            name = f"test split{' inverted' if inverted else ''}, 48x48 canvases x{scale} ({48 * scale} px) as JPEG"
            rows[name] = compare(model, *digits(inverted, scale, 1000), settings)
    rows["photos with no digit, whole and quadrants (answer: none)"] = compare(model, *photos(none), settings)
    print(
        "| inputs | images | top-1: overlay's scale (before) | model's scale (now) | smallest decode | now vs before: "
        "same answer, largest probability difference |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        top1 = " | ".join(f"{r[k]:.1%}" for k in ("before", "now", "smallest"))
        print(f"| {name} | {r['images']} | {top1} | {r['agree']:.1%}, {r['max_diff']:.3f} |")


if __name__ == "__main__":
    main()
