"""ONNX export: parity with PyTorch, metadata, dynamic batch, atomic writes, Triton repository."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.cli import main as export_main
from export.cli import verification_images
from export.onnx_export import ExportError, export, output_names, verify
from export.triton import write_repository
from models import checkpoint
from models.warn import WARN, WARNConfig


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    """A small WARN, briefly trained so its answers are not all ties, saved as a checkpoint."""
    from models.data import ClutteredDigits, ClutterSpec

    torch.manual_seed(0)
    ds = ClutteredDigits("train", 0, ClutterSpec(train_per_scan=1))
    model = WARN(WARNConfig(depth=10, width=1, attention_depth=3, attention_width=2)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(10):
        x, y = ds.images[i * 32 : (i + 1) * 32], ds.targets[i * 32 : (i + 1) * 32]
        loss = model.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    meta = {"dataset": "cluttered-digits", "train": {"seed": 0}, "metrics": {"top1_accuracy": 0.5}}
    checkpoint.save(path, model, **meta)
    return path


@pytest.fixture(scope="module")
def exported(trained_model, tmp_path_factory):
    model, meta = checkpoint.load(trained_model)
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    images = verification_images(meta, model.config.input_size, count=32)
    result = export(model, meta, out, images, name="warn-test", version="7")
    return model, out, result, images


def test_parity_with_pytorch_on_real_images(exported):
    model, out, result, images = exported
    batches = result["verification"]["cpu"]["batches"]
    assert set(batches) == {1, 3, 16}
    for report in batches.values():
        assert report["probabilities"] <= 1e-4 and report["gates"] <= 1e-4 and report["attention"] <= 5e-5
        assert report["log_probabilities"] <= 1e-3
        assert report["top1_agreement"] == 1.0
    onnx.checker.check_model(str(out), full_check=True)


def test_verification_images_are_real_digits(exported):
    *_, images = exported
    assert images.shape == (32, 3, 48, 48) and images.std() > 0.05


def test_outputs_and_metadata_round_trip(exported):
    model, out, result, _ = exported
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == output_names(3)
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["model_name"] == "warn-test" and meta["model_version"] == "7"
    assert json.loads(meta["class_names"]) == [str(i) for i in range(10)]
    assert json.loads(meta["input_size"]) == [48, 48]
    assert json.loads(meta["normalization"])["mean"] == list(model.config.mean)
    arch = json.loads(meta["architecture"])
    assert (arch["depth"], arch["width"], arch["attention_depth"], arch["attention_width"]) == (10, 1, 3, 2)
    assert json.loads(meta["attention_strides"]) == [1, 2, 4]
    assert json.loads(meta["layer_names"]) == ["attention_0", "attention_1", "attention_2", "backbone"]
    assert set(json.loads(meta["outputs"])) == set(output_names(3))
    assert json.loads(meta["metrics"]) == {"top1_accuracy": 0.5}
    # measured on a dataset without boxes here: recorded as not measured, per layer
    assert json.loads(meta["pointing_game"]) == {"layers": [None] * 3, "combined": None, "tolerance_px": None}
    assert meta["dataset"] == "cluttered-digits"
    assert len(meta["weights_sha256"]) == 64


def test_the_file_is_readable_by_other_users_as_open_would_make_it(trained_model, tmp_path):
    """A container's non-root user reads a model mounted from the host or copied into the image."""
    model, meta = checkpoint.load(trained_model)
    images = verification_images(meta, model.config.input_size, count=4)
    umask = os.umask(0o027)
    try:
        export(model, meta, tmp_path / "m.onnx", images, name="warn-test")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m.onnx").stat().st_mode) == 0o640


def test_dynamic_batch_in_one_session(exported):
    model, out, *_ = exported
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 16, 1):
        probs, *rest = session.run(None, {"image": np.random.rand(n, 3, 48, 48).astype(np.float32)})
        assert probs.shape == (n, 10)
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
        assert rest[1].shape == (n, 2, 48, 48)


def test_a_mismatch_fails_verification(exported):
    model, out, *_ = exported
    other = WARN(model.config).eval()  # different weights, same graph shape
    with pytest.raises(ExportError, match="differs from PyTorch"):
        verify(out, other, exported[3][:4], batch_sizes=(1,))


CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not CUDA, reason="onnxruntime has no CUDA provider here")
def test_cuda_verification_agrees_with_pytorch_with_tf32_off(exported):
    model, out, _, images = exported
    report = verify(out, model, images, provider="cuda")
    assert report["provider"] == "cuda" and set(report["batches"]) == {1, 3, 16}
    for worst in report["batches"].values():
        assert worst["probabilities"] <= 1e-4 and worst["top1_agreement"] == 1.0


@pytest.mark.skipif(CUDA, reason="this onnxruntime has the CUDA provider")
def test_cuda_verification_without_the_provider_says_what_to_install(exported):
    model, out, _, images = exported
    with pytest.raises(ExportError, match="install onnxruntime-gpu"):
        verify(out, model, images[:2], provider="cuda")
    with pytest.raises(ExportError, match="unknown verification provider"):
        verify(out, model, images[:2], provider="tpu")


def test_bad_checkpoints_fail_cleanly_and_leave_nothing(tmp_path, capsys):
    target = tmp_path / "model.onnx"
    with pytest.raises(SystemExit, match="checkpoint not found"):
        export_main([str(tmp_path / "missing.pt"), str(target)])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02garbage")
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        export_main([str(corrupt), str(target)])
    assert list(tmp_path.iterdir()) == [corrupt]


def test_failed_verification_leaves_no_partial_file(trained_model, tmp_path, monkeypatch):
    import export.onnx_export as ox

    model, meta = checkpoint.load(trained_model)
    monkeypatch.setattr(
        ox, "TOLERANCES", {"probabilities": -1.0, "log_probabilities": 1.0, "gates": 1.0, "attention": 1.0}
    )
    with pytest.raises(ExportError):
        export(model, meta, tmp_path / "model.onnx", torch.rand(2, 3, 48, 48), name="x")
    assert list(tmp_path.iterdir()) == []


def test_triton_repository_agrees_with_the_graph(exported, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    _, out, *_ = exported
    folder = write_repository(out, tmp_path, "warn-test", version="3", max_batch_size=32)
    assert [p.name for p in folder.iterdir() if p.is_dir()] == ["3"]  # the folder follows the version
    assert (folder / "3" / "model.onnx").read_bytes() == out.read_bytes()
    with pytest.raises(ValueError, match="positive integers"):
        write_repository(out, tmp_path, "warn-test", version="v2")
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "warn-test" and config.backend == "onnxruntime" and config.max_batch_size == 32
    assert config.HasField("dynamic_batching")
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    graph = onnx.load(str(out)).graph
    for entries, values in ((config.input, graph.input), (config.output, graph.output)):
        assert [e.name for e in entries] == [v.name for v in values]
        for e, v in zip(entries, values):
            assert e.data_type == model_config_pb2.TYPE_FP32
            assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            assert list(e.dims) == [d.dim_value for d in v.type.tensor_type.shape.dim[1:]]


def test_no_tensor_grows_with_classes_times_pixels_and_batch_64_runs(tmp_path):
    """The per-pixel formulation held (N, K*(C+2), h, w); pool-first holds nothing of C x H x W per image."""
    from math import prod

    from export.onnx_export import _export

    torch.manual_seed(0)
    h = w = 24
    cfg = WARNConfig(depth=10, width=1, num_classes=500, attention_width=4, input_size=(h, w))
    model = WARN(cfg).eval()
    path = tmp_path / "wide.onnx"
    _export(model, path)
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    limit = cfg.num_classes * h * w
    checked = 0
    for v in [*graph.value_info, *graph.output]:
        dims = v.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param:  # constants and weights have no batch dimension
            continue
        assert all(d.HasField("dim_value") for d in dims[1:]), f"{v.name} has an unknown dimension"
        assert prod(d.dim_value for d in dims[1:]) < limit, f"{v.name} grows with C x H x W"
        checked += 1
    assert checked > 50
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.rand(64, 3, h, w).astype(np.float32)
    out = dict(zip(output_names(3), session.run(None, {"image": x})))
    assert out["probabilities"].shape == (64, 500) and out["attention_combined"].shape == (64, 6, 6)
    with torch.inference_mode():
        want = model(torch.from_numpy(x))
    np.testing.assert_allclose(out["probabilities"], want.probabilities.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["attention_combined"], want.combined_attention.numpy(), atol=1e-5)


def test_each_attention_module_runs_as_soon_as_its_stage_is_done(tmp_path):
    """Otherwise onnxruntime holds the full-resolution stage until the whole backbone has run (peak memory)."""
    from export.onnx_export import _export

    torch.manual_seed(0)
    model = WARN(WARNConfig(depth=10, width=1, num_classes=20, attention_width=4, input_size=(24, 24))).eval()
    _export(model, tmp_path / "m.onnx")
    so = ort.SessionOptions()
    so.enable_profiling, so.profile_file_prefix = True, str(tmp_path / "profile")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), so, providers=["CPUExecutionProvider"])
    session.run(None, {"image": np.random.rand(2, 3, 24, 24).astype(np.float32)})
    events = json.loads(Path(session.end_profiling()).read_text())
    shapes = [
        next(iter(e["args"]["output_type_shape"][0].values()))
        for e in events
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["args"].get("output_type_shape")
    ]
    channels, sizes = model.backbone.stage_channels, (24, 12, 6)
    for stage in range(2):
        pooled = shapes.index([2, 4 * 9, channels[stage]])  # this stage's Z pooled through its 4 masks
        size = sizes[stage + 1]
        next_stage = next(i for i, s in enumerate(shapes) if s[1:] == [channels[stage + 1], size, size])
        assert pooled < next_stage, f"stage {stage}'s attention waits for stage {stage + 1}"


def test_mask_logits_are_exported_in_their_reordered_forms(exported):
    """Kernel rows at the shallowest attended layer, kernel taps below it and at the global gate
    (models.attention.mask_logits), and no 3x3 convolution with K outputs."""
    model, out, _, _ = exported
    graph = onnx.load(str(out)).graph
    shapes = {i.name: tuple(onnx.numpy_helper.to_array(i).shape) for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert all(n.input[1] in shapes for n in convs)  # the reordered weights are folded into the file
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs]
    kernels = [shapes[n.input[1]] for n in convs]
    k, channels = model.config.attention_width, model.backbone.stage_channels
    assert groups.count(9 * k) == 2 and groups.count(9) == 1  # taps: layers 1 and 2, the global gate (K=1)
    assert groups.count(k) == len(model.attended)  # each layer's masks shifted by a one-hot convolution
    assert (max(3 * k, 16), channels[model.attended[0]], 1, 3) in kernels  # rows: layer 0
    assert not any(shape[0] == k and shape[2:] == (3, 3) for shape in kernels)


def test_maps_are_graph_outputs_equal_to_pytorch(exported):
    model, out, _, images = exported
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = dict(zip(output_names(3), session.run(None, {"image": images[:8].numpy()})))
    with torch.inference_mode():
        want = model(images[:8])
    for i, m in enumerate(want.attention_maps):
        np.testing.assert_allclose(got[f"attention_map_{i}"], m.numpy(), atol=5e-5)
        np.testing.assert_allclose(got[f"attention_map_{i}"].sum((1, 2)), 1, atol=1e-5)
    np.testing.assert_allclose(got["attention_combined"], want.combined_attention.numpy(), atol=5e-5)
    assert got["attention_combined"].shape == (8, 12, 12)
    assert json.loads(session.get_modelmeta().custom_metadata_map["export_format"]) == 2
