"""The CUDA provider where onnxruntime has it (skipped elsewhere): it is the one in use, and agrees with CPU;
and what the service does only on CUDA (padded batches), checked on the CPU too."""

import ctypes
import threading

import numpy as np
import onnxruntime as ort
import pytest

from service.config import Settings
from service.model import BATCH_DIM, CU_CTX_SCHED_BLOCKING_SYNC, FixedBuffers, OnnxModel, cuda_blocking_sync
from service.shared_session import RemoteModel, SharedSession

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


def driver():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


@pytest.mark.skipif(driver() is not None, reason="this host has a CUDA driver")
def test_blocking_sync_without_a_driver_says_why_and_the_model_still_loads(model_path):
    assert "no CUDA driver" in cuda_blocking_sync()
    model = OnnxModel(model_path, "auto", blocking_sync=True)
    assert model.info.providers[0] == "CPUExecutionProvider"


@pytest.mark.skipif(not CUDA or driver() is None, reason="no CUDA provider or no CUDA driver here")
def test_blocking_sync_reaches_the_context_onnxruntime_uses(model_path):
    s = Settings(MODEL_PATH=model_path)
    model = OnnxModel(model_path, "CUDAExecutionProvider", 0, s.cuda_options(), blocking_sync=True)
    model.run(np.zeros((4, 3, *model.info.input_size), np.float32))
    cuda, handle, flags, active = driver(), ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    assert cuda.cuDeviceGet(ctypes.byref(handle), 0) == 0
    assert cuda.cuDevicePrimaryCtxGetState(handle, ctypes.byref(flags), ctypes.byref(active)) == 0
    assert active.value == 1 and flags.value & CU_CTX_SCHED_BLOCKING_SYNC


@pytest.mark.skipif(not CUDA or driver() is None, reason="no CUDA provider or no CUDA driver here")
def test_the_shared_session_runs_on_cuda_and_matches_cpu(model_path, monkeypatch):
    monkeypatch.setenv("WARN_MODEL_PATH", str(model_path))
    session = SharedSession(startup_timeout_s=120)
    session.start()
    try:
        remote = RemoteModel(session.address, session.key)
        assert remote.info.providers[0] == "CUDAExecutionProvider"
        x = np.random.default_rng(0).random((5, 3, *remote.info.input_size), dtype=np.float32)
        want = OnnxModel(model_path, "CPUExecutionProvider").run(x)
        np.testing.assert_allclose(remote.run(x)["probabilities"], want["probabilities"], atol=1e-4)
    finally:
        session.stop()


def test_a_padded_batch_answers_as_the_batch_itself(model_path):
    """WARN_CUDA_FIXED_BATCH: every run has the fixed number of rows (a larger batch in chunks), the padding's
    answers dropped."""
    model = OnnxModel(model_path, "CPUExecutionProvider", fixed_batch=8)
    assert model.fixed_batch == 0  # only where the session runs on CUDA
    x = np.random.default_rng(0).random((11, 3, *model.info.input_size), dtype=np.float32)
    want = model.run(x)
    seen = []
    run = model._run
    model._run = lambda batch: seen.append(len(batch)) or run(batch)
    model.fixed_batch = 8  # as on CUDA
    for n in (1, 3, 8, 11):
        got = model.run(x[:n])
        for name, value in got.items():
            assert value.shape == want[name][:n].shape
            np.testing.assert_allclose(value, want[name][:n], rtol=1e-5, atol=1e-6, err_msg=name)
    assert seen == [8, 8, 8, 8, 8]  # 11 rows: 8, then 3 padded to 8


@pytest.mark.skipif(not CUDA or driver() is None, reason="no CUDA provider or no CUDA driver here")
def test_padded_batches_on_cuda_match_cpu(model_path):
    s = Settings(MODEL_PATH=model_path)
    cuda = OnnxModel(model_path, "CUDAExecutionProvider", 0, s.cuda_options(), fixed_batch=8)
    cpu = OnnxModel(model_path, "CPUExecutionProvider")
    assert cuda.fixed_batch == 8
    x = np.random.default_rng(0).random((5, 3, *cuda.info.input_size), dtype=np.float32)
    for n in (1, 5):
        np.testing.assert_allclose(cuda.run(x[:n])["probabilities"], cpu.run(x[:n])["probabilities"], atol=1e-4)


def fixed_session(model_path, rows: int) -> ort.InferenceSession:
    """A CPU session with the batch dimension fixed at load, as WARN_CUDA_GRAPH fixes it on CUDA."""
    options = ort.SessionOptions()
    options.add_free_dimension_override_by_name(BATCH_DIM, rows)
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def test_buffers_bound_once_answer_each_run_with_its_own_outputs(model_path):
    """WARN_CUDA_GRAPH's runs share one input and one set of outputs (a CUDA graph replays on that memory): each
    answer must be a copy, which a later run does not overwrite, also when callers run at once."""
    session = fixed_session(model_path, 4)
    assert all(isinstance(d, int) for o in session.get_outputs() for d in o.shape)  # every shape fixed at load
    buffers = FixedBuffers(session, 4, "cpu")
    rng = np.random.default_rng(0)
    batches = [rng.random((4, 3, *session.get_inputs()[0].shape[2:]), dtype=np.float32) for _ in range(6)]
    want = [dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": x}))) for x in batches]
    first = buffers.run(batches[0])
    buffers.run(batches[1])
    for name, value in want[0].items():
        np.testing.assert_array_equal(first[name], value, err_msg=name)

    got: dict[int, dict] = {}

    def caller(i: int) -> None:
        for _ in range(5):
            got[i] = buffers.run(batches[i])

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, expected in enumerate(want):
        for name, value in expected.items():
            np.testing.assert_array_equal(got[i][name], value, err_msg=f"caller {i}: {name}")


def test_cuda_graph_is_ignored_where_the_session_runs_on_the_cpu(model_path):
    model = OnnxModel(model_path, "CPUExecutionProvider", fixed_batch=8, cuda_graph=True)
    assert model.buffers is None and model.fixed_batch == 0
    x = np.random.default_rng(0).random((3, 3, *model.info.input_size), dtype=np.float32)
    assert model.run(x)["probabilities"].shape == (3, len(model.info.class_names))


@pytest.mark.skipif(not CUDA or driver() is None, reason="no CUDA provider or no CUDA driver here")
def test_cuda_graph_runs_match_cpu(model_path):
    """The first runs are captured, later ones replayed: each answers its own batch, padded or full."""
    s = Settings(MODEL_PATH=model_path)
    cuda = OnnxModel(model_path, "CUDAExecutionProvider", 0, s.cuda_options(), fixed_batch=8, cuda_graph=True)
    cpu = OnnxModel(model_path, "CPUExecutionProvider")
    assert cuda.buffers is not None and cuda.info.providers[0] == "CUDAExecutionProvider"
    assert cuda.info.inputs == cpu.info.inputs and cuda.info.outputs == cpu.info.outputs  # the batch stays -1
    rng = np.random.default_rng(0)
    answers = []
    for n in (8, 3, 8, 1, 11):
        x = rng.random((n, 3, *cuda.info.input_size), dtype=np.float32)
        answers.append((cuda.run(x), cpu.run(x)))
    for got, want in answers:  # compared after every run: no answer is a view of the shared buffers
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=1e-3, err_msg=name)


def test_a_cuda_graph_session_that_falls_back_to_the_cpu_still_runs_any_batch(model_path, monkeypatch):
    # CUDA asked for and not loaded (its libraries missing): the batch dimension was fixed at load all the same
    monkeypatch.setattr("service.model.choose_providers", lambda _: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    model = OnnxModel(model_path, "auto", 1, Settings().cuda_options(), fixed_batch=4, cuda_graph=True)
    if model.info.providers[0] == "CUDAExecutionProvider":
        pytest.skip("CUDA loaded here: no fallback to check")
    cpu = OnnxModel(model_path, "CPUExecutionProvider")
    x = np.random.default_rng(0).random((6, 3, *cpu.info.input_size), dtype=np.float32)
    for n in (1, 4, 6):
        np.testing.assert_allclose(model.run(x[:n])["probabilities"], cpu.run(x[:n])["probabilities"], atol=1e-5)
