"""Peak resident memory of onnxruntime (CPU) running a model, each in a fresh process.

    python -m bench.memory        # WRN-16-4, 1000 classes, 112x112, batch 8: WARN vs its AD=0 backbone

Both formulations of the attention are measured: pool-first (the model as it is) and the per-pixel
one it replaced (tests/reference_attention.py), which held (N, K*(C+2), h, w) at every attended stage.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from export.onnx_export import _export
from models.attention import AttentionModule, GlobalGate
from models.warn import WARN, WARNConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"depth": 16, "width": 4, "num_classes": 1000, "attention_width": 4, "input_size": (112, 112)}


@contextmanager
def per_pixel():
    """Temporarily swap in the per-pixel formulation (for before/after figures only)."""
    sys.path.insert(0, str(ROOT))
    from tests import reference_attention as ref

    saved = AttentionModule.forward, GlobalGate.forward
    AttentionModule.forward, GlobalGate.forward = ref.attention_module, ref.global_gate
    try:
        yield
    finally:
        AttentionModule.forward, GlobalGate.forward = saved


def peak_rss_mb(path: Path, batch: int, threads: int, runs: int = 3, level: str = "ORT_ENABLE_ALL") -> float:
    """Peak RSS of a fresh process that loads `path` and runs it `runs` times at `batch`.

    `level`: onnxruntime's graph optimization level; ORT_ENABLE_EXTENDED leaves out the blocked (NCHWc)
    convolution layout, which copies each attended stage back to NCHW for the pooling product.
    """
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "so = ort.SessionOptions(); so.intra_op_num_threads = int(sys.argv[3])\n"
        "so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, sys.argv[4])\n"
        "s = ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider'])\n"
        "shape = [int(sys.argv[2])] + s.get_inputs()[0].shape[1:]\n"
        "x = np.random.rand(*shape).astype(np.float32)\n"
        f"for _ in range({runs}): s.run(None, {{'image': x}})\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so it would include the parent's peak
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), str(batch), str(threads), level],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # VmHWM is in KiB


def measure(batch: int = 8, threads: int = 2) -> dict:
    torch.manual_seed(0)
    results: dict = {"model": "warn-16-4-ad3-aw4, 1000 classes, 112x112", "batch": batch}
    with tempfile.TemporaryDirectory() as tmp:
        warn = WARN(WARNConfig(**CONFIG)).eval()
        plain = WARN(WARNConfig(**{**CONFIG, "attention_depth": 0})).eval()
        _export(warn, Path(tmp) / "warn.onnx")
        _export(plain, Path(tmp) / "plain.onnx")
        with per_pixel():
            _export(warn, Path(tmp) / "per_pixel.onnx")
        for name in ("warn", "plain", "per_pixel"):
            results[f"{name}_peak_mb"] = peak_rss_mb(Path(tmp) / f"{name}.onnx", batch, threads)
        for name in ("warn", "plain"):
            path = Path(tmp) / f"{name}.onnx"
            results[f"{name}_unblocked_peak_mb"] = peak_rss_mb(path, batch, threads, level="ORT_ENABLE_EXTENDED")
    results["ratio"] = results["warn_peak_mb"] / results["plain_peak_mb"]
    results["unblocked_ratio"] = results["warn_unblocked_peak_mb"] / results["plain_unblocked_peak_mb"]
    results["per_pixel_ratio"] = results["per_pixel_peak_mb"] / results["plain_peak_mb"]
    return results


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
