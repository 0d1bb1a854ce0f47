"""The CUDA provider where onnxruntime has it (skipped elsewhere): it is the one in use, and agrees with CPU."""

import numpy as np
import onnxruntime as ort
import pytest

from service.config import Settings
from service.model import OnnxModel

CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_cuda_options_default_to_exact_math():
    options = Settings().cuda_options()
    assert options["use_tf32"] == 0 and options["arena_extend_strategy"] == "kSameAsRequested"
    assert "gpu_mem_limit" not in options
    assert Settings(CUDA_MEM_LIMIT_BYTES=2 << 30, CUDA_TF32=True).cuda_options()["gpu_mem_limit"] == 2 << 30


@pytest.mark.skipif(not CUDA, reason="onnxruntime has no CUDA provider here")
@pytest.mark.parametrize("io_binding", [True, False])
def test_cuda_is_active_and_matches_cpu(model_path, io_binding):
    s = Settings(MODEL_PATH=model_path)
    cuda = OnnxModel(model_path, "CUDAExecutionProvider", 0, s.cuda_options(), io_binding)
    cpu = OnnxModel(model_path, "CPUExecutionProvider")
    assert cuda.info.providers[0] == "CUDAExecutionProvider"
    x = np.random.default_rng(0).random((16, 3, *cuda.info.input_size), dtype=np.float32)
    got, want = cuda.run(x), cpu.run(x)
    assert set(got) == set(want)
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-4)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-3, rtol=1e-3, err_msg=name)
