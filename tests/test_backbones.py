"""WARN on torchvision backbones: building, loading weights, fine-tuning, exporting and serving."""

import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw, ImageFilter

from export.cli import main as export_main
from export.onnx_export import export
from models import checkpoint
from models.backbones import backbone_parameters
from models.train import TrainConfig, train
from models.warn import WARN, Architecture, WARNConfig
from service.config import Settings
from service.main import create_app

SHAPES = ("circle", "square", "triangle")


@pytest.mark.parametrize(
    "name, channels",
    [
        ("resnet18", [64, 128, 256, 512]),
        ("resnet50", [256, 512, 1024, 2048]),
        ("wide_resnet50_2", [256, 512, 1024, 2048]),
        ("convnext_tiny", [96, 192, 384, 768]),
    ],
)
def test_attention_attaches_to_the_last_stages(name, channels):
    model = WARN(WARNConfig(backbone=name, num_classes=7, attention_depth=3, input_size=(64, 64))).eval()
    assert model.backbone.stage_channels == channels and model.strides == [8, 16, 32]
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    assert out.probabilities.shape == (2, 7) and [a.shape[-1] for a in out.attention] == [8, 4, 2]
    torch.testing.assert_close(out.probabilities.sum(1), torch.ones(2))
    old, new = backbone_parameters(model)
    assert model.backbone.last_layer().weight in [p for p in new]  # the resized last layer is new
    assert sum(p.numel() for p in old) + sum(p.numel() for p in new) == sum(p.numel() for p in model.parameters())


def test_convnext_exports_within_tolerance(tmp_path):
    torch.manual_seed(0)
    model = WARN(WARNConfig(backbone="convnext_tiny", num_classes=4, attention_depth=2, input_size=(32, 32))).eval()
    result = export(model, {}, tmp_path / "m.onnx", torch.rand(3, 3, 32, 32), name="convnext", version="1")
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).metadata_props}
    assert json.loads(props["architecture"])["backbone"] == "convnext_tiny"
    assert json.loads(props["attention_strides"]) == [16, 32]
    assert result["verification"]["cpu"]["batches"][3]["top1_agreement"] == 1.0


def draw_shape(kind: str, rng: np.random.Generator) -> Image.Image:
    """A shape on a photo-like background: a colour gradient, blurred blobs and sensor noise."""
    w, h = int(rng.integers(72, 120)), int(rng.integers(72, 120))
    base = np.linspace(rng.uniform(0, 255, 3), rng.uniform(0, 255, 3), w)[None].repeat(h, 0)
    img = Image.fromarray(base.astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x, y, r = rng.integers(0, w), rng.integers(0, h), rng.integers(5, 20)
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    img = img.filter(ImageFilter.GaussianBlur(3))
    d = ImageDraw.Draw(img)
    s = int(rng.integers(18, 30))
    x, y = int(rng.integers(s, w - s)), int(rng.integers(s, h - s))
    colour = tuple(int(c) for c in rng.integers(0, 255, 3))
    if kind == "circle":
        d.ellipse([x - s, y - s, x + s, y + s], fill=colour)
    elif kind == "square":
        d.rectangle([x - s, y - s, x + s, y + s], fill=colour)
    else:
        d.polygon([(x, y - s), (x - s, y + s), (x + s, y + s)], fill=colour)
    noisy = np.asarray(img, np.float32) + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 4)):
        for kind in SHAPES:
            (root / split / kind).mkdir(parents=True)
            for i in range(count):
                draw_shape(kind, rng).save(root / split / kind / f"{i}.jpg", quality=90)
    return root


def test_fine_tune_export_and_serve(shapes_folder, tmp_path):
    import torchvision

    # a "pretrained" backbone of the test's own: torchvision's resnet18, seeded, saved as a state dict
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18(weights=None)
    weights = tmp_path / "resnet18.pth"
    torch.save(imagenet.state_dict(), weights)

    cfg = TrainConfig(
        dataset="imagefolder",
        data_root=str(shapes_folder),
        arch=Architecture(backbone="resnet18", attention_depth=2),
        weights=str(weights),
        freeze_epochs=1,
        input_size=64,
        epochs=1,
        batch_size=8,
        lr=0.05,
        threads=2,
        out=str(tmp_path / "run"),
    )
    meta = train(cfg)
    assert meta["metrics"]["images"] == 12
    payload = checkpoint.read(tmp_path / "run/model.pt")
    assert payload["config"]["backbone"] == "resnet18" and payload["strides"] == [16, 32]
    assert payload["config"]["mean"] == [0.485, 0.456, 0.406]  # ImageNet weights, ImageNet normalization
    state = payload["state_dict"]
    # the backbone came from the file and stayed frozen for the epoch; the new parts learned
    torch.testing.assert_close(state["backbone.body.conv1.weight"], imagenet.conv1.weight)
    torch.testing.assert_close(state["backbone.body.bn1.running_mean"], imagenet.bn1.running_mean)
    fresh = WARN(WARNConfig(**payload["config"]))
    assert not torch.equal(state["attention.0.conv.weight"], fresh.state_dict()["attention.0.conv.weight"])

    onnx_path = tmp_path / "run/model.onnx"
    export_main([str(tmp_path / "run/model.pt"), str(onnx_path), "--name", "shapes"])  # verified on the way
    image = next((shapes_folder / "val/square").iterdir()).read_bytes()
    with TestClient(create_app(Settings(MODEL_PATH=onnx_path, STORE="memory"))) as client:
        model = client.get("/v1/model").json()
        assert model["classes"] == list(SHAPES) and [a["stride"] for a in model["attended_layers"]] == [16, 32]
        answer = client.post("/v1/predict", content=image, headers={"content-type": "image/jpeg"}).json()
        assert answer["top_k"][0]["label"] in SHAPES and len(answer["layers"]) == 3
        overlay = client.get(answer["attention_urls"]["combined"])
        assert overlay.status_code == 200
        with Image.open(io.BytesIO(overlay.content)) as png:
            assert png.size == (answer["image"]["width"], answer["image"]["height"])
