"""A model repository that NVIDIA Triton Inference Server loads with its onnxruntime backend."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

# ONNX TensorProto element types to Triton's data_type names.
TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
}


def _tensor_entries(values: list[onnx.ValueInfoProto]) -> str:
    entries = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim[1:]]  # the batch dimension is implied by max_batch_size
        if any(d <= 0 for d in dims):
            raise ValueError(f"{v.name}: Triton needs fixed non-batch dims, got {dims}")
        entries.append(
            "  {\n"
            f'    name: "{v.name}"\n'
            f"    data_type: {TRITON_TYPES[t.elem_type]}\n"
            f"    dims: [ {', '.join(map(str, dims))} ]\n"
            "  }"
        )
    return ",\n".join(entries)


def config_pbtxt(model: onnx.ModelProto, name: str, max_batch_size: int = 64, queue_delay_us: int = 2000) -> str:
    """Triton's config.pbtxt for `model`: every input and output, dynamic batching, on a GPU."""
    return (
        f'name: "{name}"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{_tensor_entries(list(model.graph.input))}\n]\n"
        f"output [\n{_tensor_entries(list(model.graph.output))}\n]\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {queue_delay_us}\n"
        "}\n"
        "instance_group [\n"
        "  {\n"
        "    count: 1\n"
        "    kind: KIND_GPU\n"
        "  }\n"
        "]\n"
    )


def write_repository(onnx_path: str | Path, repo: str | Path, name: str, max_batch_size: int = 64) -> Path:
    """Write repo/<name>/config.pbtxt and repo/<name>/1/model.onnx; returns the model's folder."""
    folder = Path(repo) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, folder / "1" / "model.onnx")
    model = onnx.load(str(onnx_path), load_external_data=False)
    (folder / "config.pbtxt").write_text(config_pbtxt(model, name, max_batch_size))
    return folder
