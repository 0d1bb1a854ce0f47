"""A model repository that NVIDIA Triton Inference Server (and KServe's Triton runtime) loads with its
onnxruntime backend. config.pbtxt is built as Triton's own ModelConfig message (tritonclient ships it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

# ONNX TensorProto element types to Triton's data types.
TRITON_TYPES = {
    onnx.TensorProto.FLOAT: mc.TYPE_FP32,
    onnx.TensorProto.FLOAT16: mc.TYPE_FP16,
    onnx.TensorProto.INT64: mc.TYPE_INT64,
    onnx.TensorProto.INT32: mc.TYPE_INT32,
}


def _dims(v: onnx.ValueInfoProto) -> tuple[int, list[int]]:
    t = v.type.tensor_type
    dims = [d.dim_value for d in t.shape.dim[1:]]  # the batch dimension is implied by max_batch_size
    if any(d <= 0 for d in dims):
        raise ValueError(f"{v.name}: Triton needs fixed non-batch dims, got {dims}")
    return TRITON_TYPES[t.elem_type], dims


def model_config(
    model: onnx.ModelProto, name: str, max_batch_size: int = 64, queue_delay_us: int = 2000
) -> mc.ModelConfig:
    """Triton's configuration for `model`: every input and output, dynamic batching, on a GPU."""
    config = mc.ModelConfig(name=name, backend="onnxruntime", max_batch_size=max_batch_size)
    for v in model.graph.input:
        data_type, dims = _dims(v)
        config.input.add(name=v.name, data_type=data_type, dims=dims)
    for v in model.graph.output:
        data_type, dims = _dims(v)
        config.output.add(name=v.name, data_type=data_type, dims=dims)
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_GPU)
    return config


def version_folder(version: str) -> str:
    """Triton's folder name for `version`: model versions there are positive integers."""
    if not (version.isascii() and version.isdigit() and int(version) > 0):
        raise ValueError(f"Triton's model versions are positive integers (its folder names); got {version!r}")
    return str(int(version))


def write_repository(
    onnx_path: str | Path, repo: str | Path, name: str, version: str = "1", max_batch_size: int = 64
) -> Path:
    """Write repo/<name>/config.pbtxt and repo/<name>/<version>/model.onnx; returns the model's folder."""
    folder = Path(repo) / name
    (folder / version_folder(version)).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, folder / version_folder(version) / "model.onnx")
    model = onnx.load(str(onnx_path), load_external_data=False)
    (folder / "config.pbtxt").write_text(text_format.MessageToString(model_config(model, name, max_batch_size)))
    return folder
