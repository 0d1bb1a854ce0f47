"""The ONNX model on onnxruntime, and what its metadata says about it."""

from __future__ import annotations

import ctypes
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from service.errors import ModelLoadError
from service.tensors import DTYPES

if TYPE_CHECKING:
    from service.config import Settings

log = logging.getLogger("service.model")

REQUIRED_METADATA = ("model_name", "model_version", "class_names", "input_size", "attention_strides", "layer_names")
# The output contract this service reads: format 2 added the attention maps computed in the graph.
EXPORT_FORMAT = 2
BATCH_DIM = "batch"  # warn-export's name for the batch dimension


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # Open Inference Protocol datatype, e.g. FP32
    shape: list[int]  # -1 for the dynamic batch dimension


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    class_names: list[str]
    input_size: tuple[int, int]  # (H, W)
    strides: list[int]  # one per attended layer
    layer_names: list[str]  # attended layers, then "backbone"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    providers: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def attended_layers(self) -> int:
        return len(self.strides)

    @property
    def pointing_game(self) -> dict[str, Any]:
        """Each attended layer's Pointing Game and the combined map's, as measured before export (None: not
        measured, e.g. a dataset without boxes or a file exported before this was recorded)."""
        found = self.metadata.get("pointing_game")
        if not isinstance(found, dict):
            return {"layers": [None] * self.attended_layers, "combined": None, "tolerance_px": None}
        return found


ORT_TO_V2 = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(int64)": "INT64", "tensor(int32)": "INT32"}


def choose_providers(setting: str) -> list[str]:
    """Provider names to ask onnxruntime for, from the PROVIDERS setting, in order of preference."""
    available = ort.get_available_providers()
    if setting.strip().lower() == "auto":
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        wanted = [p.strip() for p in setting.split(",") if p.strip()]
    chosen = [p for p in wanted if p in available]
    missing = [p for p in wanted if p not in available]
    if missing and setting != "auto":
        log.warning("providers %s are not in this onnxruntime build (it has %s)", missing, available)
    return chosen or ["CPUExecutionProvider"]


def _spec(arg: Any, batch_fixed_at_load: bool = False) -> TensorSpec:
    shape = [d if isinstance(d, int) else -1 for d in arg.shape]
    if batch_fixed_at_load:  # for a CUDA graph's buffers; a request still carries any number of rows
        shape[0] = -1
    return TensorSpec(arg.name, ORT_TO_V2.get(arg.type, arg.type), shape)


def _parse(raw: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


CU_CTX_SCHED_BLOCKING_SYNC = 0x04


def cuda_driver() -> tuple[ctypes.CDLL | None, str | None]:
    """The CUDA driver API, initialised (no context made), or None and why not."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return None, f"no CUDA driver ({e})"
    status = driver.cuInit(0)
    return (driver, None) if status == 0 else (None, f"the CUDA driver refused with error {status}")


def cuda_devices() -> int:
    """GPUs the CUDA driver sees (0 without a driver)."""
    driver, _ = cuda_driver()
    count = ctypes.c_int()
    if driver is None or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def runs_on_cuda(providers: str) -> bool:
    """Whether a session made with this PROVIDERS setting would run on a GPU: onnxruntime has the CUDA
    provider, the setting allows it, and the driver sees a device."""
    return "CUDAExecutionProvider" in choose_providers(providers) and cuda_devices() > 0


def cuda_blocking_sync(device: int = 0) -> str | None:
    """Make threads that wait for `device` sleep until it is done, instead of spinning on a core.

    Applies to the device's primary context, the one onnxruntime's CUDA provider uses, so it must run
    before the session is made. CUDA spins by default wherever a process has fewer contexts than
    the host has cores, so each worker would burn a core for as long as its run is on the GPU.
    Returns None, or why it could not (no driver, or the driver's error code).
    """
    driver, why = cuda_driver()
    if driver is None:
        return why
    handle = ctypes.c_int()
    set_flags = getattr(driver, "cuDevicePrimaryCtxSetFlags_v2", None) or driver.cuDevicePrimaryCtxSetFlags
    status = driver.cuDeviceGet(ctypes.byref(handle), device)
    if status == 0:
        status = set_flags(handle, CU_CTX_SCHED_BLOCKING_SYNC)
    return None if status == 0 else f"the CUDA driver refused with error {status}"


class FixedBuffers:
    """A session's input and outputs bound once, at fixed addresses, for runs of exactly `rows` rows: what a
    CUDA graph needs, since it replays its kernels on the memory it captured them with. Runs share the
    buffers, so they take turns; each copies its batch in and its outputs out."""

    def __init__(self, session: ort.InferenceSession, rows: int, device: str = "cuda", device_id: int = 0) -> None:
        self.session = session
        self.binding = session.io_binding()
        self.lock = threading.Lock()
        (image,) = session.get_inputs()
        self.input = self._buffer(image, rows, device, device_id)
        self.binding.bind_ortvalue_input(image.name, self.input)
        self.outputs = {o.name: self._buffer(o, rows, device, device_id) for o in session.get_outputs()}
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)
        self.views = device == "cpu"  # numpy() of a CPU value is a view, which the next run overwrites

    @staticmethod
    def _buffer(arg: Any, rows: int, device: str, device_id: int) -> ort.OrtValue:
        shape = [rows, *arg.shape[1:]]
        if not all(isinstance(d, int) for d in shape) or arg.type not in ORT_TO_V2:
            raise ModelLoadError(f"{arg.name} ({arg.type} {arg.shape}) cannot be bound once: its shape is not fixed")
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, DTYPES[ORT_TO_V2[arg.type]], device, device_id)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with self.lock:
            self.input.update_inplace(np.ascontiguousarray(batch, dtype=np.float32))
            self.session.run_with_iobinding(self.binding)
            return {name: v.numpy().copy() if self.views else v.numpy() for name, v in self.outputs.items()}


class OnnxModel:
    """One onnxruntime session; `run` is thread-safe (onnxruntime allows concurrent run calls).

    `cuda_options` are the CUDA provider's options (TF32, memory limit, arena growth, cuDNN search);
    `io_binding` binds the outputs to host memory on CUDA, so each run copies once. `spin` lets idle
    intra-op threads spin for the next run (fastest for one process alone on a machine).
    `blocking_sync` makes a run on CUDA wait for the GPU asleep (`cuda_blocking_sync`). `fixed_batch`: on
    CUDA, every run has that many rows (fewer are padded, more run in chunks of it), since the provider plans
    its convolutions again (cuDNN's heuristics, milliseconds of CPU) whenever the batch size differs from its
    last run. `cuda_graph` (with `fixed_batch`, on CUDA): the provider captures a run as a CUDA graph and
    replays it; every shape is then fixed at load (the batch dimension to `fixed_batch`).
    """

    def __init__(
        self,
        path: Path,
        providers: str = "auto",
        intra_op_threads: int = 0,
        cuda_options: dict[str, Any] | None = None,
        io_binding: bool = True,
        spin: bool = True,
        blocking_sync: bool = False,
        fixed_batch: int = 0,
        cuda_graph: bool = False,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path} (set WARN_MODEL_PATH to a file written by warn-export)")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        if not spin:  # idle threads of several workers' sessions would burn the cores the others need
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        wanted = choose_providers(providers)
        if blocking_sync and "CUDAExecutionProvider" in wanted:
            why = cuda_blocking_sync(int((cuda_options or {}).get("device_id", 0)))
            if why:
                log.warning("WARN_CUDA_BLOCKING_SYNC: %s; runs on CUDA wait spinning", why)
        graph = cuda_graph and fixed_batch > 0 and "CUDAExecutionProvider" in wanted
        if cuda_graph and not fixed_batch and "CUDAExecutionProvider" in wanted:
            log.warning("WARN_CUDA_GRAPH needs WARN_CUDA_FIXED_BATCH (a graph has fixed shapes); it is ignored")
        if graph:
            options.add_free_dimension_override_by_name(BATCH_DIM, fixed_batch)
            cuda_options = {**(cuda_options or {}), "enable_cuda_graph": "1"}
        with_options = [(p, cuda_options or {}) if p == "CUDAExecutionProvider" else p for p in wanted]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=with_options)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            hint = " (WARN_CUDA_GRAPH needs every node on CUDA: set it to false)" if graph else ""
            raise ModelLoadError(f"cannot load model {path}: {e}{hint}") from e
        active = self.session.get_providers()
        if "CUDAExecutionProvider" in wanted and "CUDAExecutionProvider" not in active:
            log.warning(
                "CUDAExecutionProvider was requested but onnxruntime fell back to %s "
                "(are the CUDA and cuDNN libraries installed?)",
                active,
            )
        raw = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in REQUIRED_METADATA if k not in raw]
        if missing:
            raise ModelLoadError(f"{path} is not a WARN export: metadata lacks {missing} (export it with warn-export)")
        meta = _parse(raw)
        found = meta.get("export_format", 1)  # format 1 files predate the key
        if found != EXPORT_FORMAT:
            raise ModelLoadError(
                f"{path} was written by warn-export format {found}; this service reads format {EXPORT_FORMAT}, "
                "whose graph also outputs the attention maps (attention_map_<i>, attention_combined). "
                "Re-export the checkpoint with this version's warn-export"
            )
        self.info = ModelInfo(
            name=str(meta["model_name"]),
            version=str(meta["model_version"]),
            class_names=list(meta["class_names"]),
            input_size=tuple(meta["input_size"]),
            strides=list(meta["attention_strides"]),  # type: ignore[arg-type]
            layer_names=list(meta["layer_names"]),
            inputs=[_spec(i, graph) for i in self.session.get_inputs()],
            outputs=[_spec(o, graph) for o in self.session.get_outputs()],
            providers=active,
            metadata=meta,
        )
        self.input_name = self.info.inputs[0].name
        self.output_names = [o.name for o in self.info.outputs]
        self.io_binding = io_binding and active[0] == "CUDAExecutionProvider"
        # a batch dimension fixed at load stays fixed where onnxruntime fell back to the CPU: runs are padded there too
        self.fixed_batch = fixed_batch if active[0] == "CUDAExecutionProvider" or graph else 0
        self.buffers = None
        if graph and active[0] == "CUDAExecutionProvider":
            device = int((cuda_options or {}).get("device_id", 0))
            self.buffers = FixedBuffers(self.session, fixed_batch, "cuda", device)
            for _ in range(2):  # onnxruntime captures the graph on the run after its first, here and not on a request
                self.buffers.run(np.zeros((fixed_batch, *self.session.get_inputs()[0].shape[1:]), np.float32))
        log.info("loaded %s v%s from %s on %s", self.info.name, self.info.version, path, active[0])

    @classmethod
    def from_settings(cls, s: Settings) -> OnnxModel:
        """The session a worker of the service (or the shared session's process) runs."""
        return cls(
            s.MODEL_PATH,
            s.PROVIDERS,
            s.intra_op_threads(),
            s.cuda_options(),
            s.IO_BINDING,
            spin=s.workers() == 1,
            blocking_sync=s.CUDA_BLOCKING_SYNC,
            fixed_batch=s.MAX_BATCH_SIZE if s.CUDA_FIXED_BATCH else 0,
            cuda_graph=s.CUDA_GRAPH,
        )

    def serving(self) -> bool:
        """Loaded in this process: always, unlike a shared session's process."""
        return True

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """(N, 3, H, W) float32 in [0, 1] -> every output by name, N first."""
        size = self.fixed_batch
        if not size or len(batch) in (0, size):  # none: the routes refuse an empty batch before this
            return self._run(batch)
        parts = [self._run_padded(batch[start : start + size]) for start in range(0, len(batch), size)]
        return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _run_padded(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """At most `fixed_batch` rows, run as exactly that many."""
        n = len(rows)
        if n == self.fixed_batch:
            return self._run(rows)
        padding = np.zeros((self.fixed_batch - n, *rows.shape[1:]), rows.dtype)
        return {k: v[:n] for k, v in self._run(np.concatenate([rows, padding])).items()}

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.buffers is not None:
            return self.buffers.run(batch)
        if not self.io_binding:
            return dict(zip(self.output_names, self.session.run(None, {self.input_name: batch})))
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(batch, dtype=np.float32))
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))
