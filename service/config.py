"""All service settings, read from WARN_* environment variables (or a .env file)."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any, Literal

import joblib
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "default_model" / "model.onnx"


@cache
def cores() -> int:
    """The cores this process may use: its CPU affinity, and its container's CPU quota where one is set
    (`docker run --cpus`, a Kubernetes limit), which os.cpu_count() ignores."""
    return joblib.cpu_count()


class Settings(BaseSettings):
    # inf and nan parse as floats: an infinite TTL failed every signed prediction with a 500
    model_config = SettingsConfigDict(env_prefix="WARN_", env_file=".env", extra="ignore", allow_inf_nan=False)

    MODEL_PATH: Path = Field(DEFAULT_MODEL, description="ONNX file written by warn-export")
    PROVIDERS: str = Field(
        "auto", description="'auto' (CUDA if onnxruntime offers it, else CPU) or a comma-separated provider list"
    )
    WORKERS: int = Field(
        0,
        ge=0,
        description="worker processes of `python -m service` (0: one per core it may use; each has its own "
        "session unless SHARED_SESSION)",
    )
    SHARED_SESSION: Literal["auto"] | bool = Field(
        "auto",
        description="the workers of `python -m service` send their batches to one session in a process of its "
        "own, which runs them together: one model in GPU memory, not one per worker. auto: on where the "
        "workers would run on a GPU (an H100, padded batches of 16: 1,856-1,909 req/s at 64 connections; a "
        "session per worker, padded to 4, 8 or 32: 1,080-1,440), off on the CPU",
    )
    SHARED_SESSION_RUNS: int = Field(
        2,
        ge=1,
        le=8,
        description="runs the shared session keeps in flight at once: while one is on the GPU, the next batches "
        "are stacked and sent, and answers sent back. Each holds its own activations in memory",
    )
    REUSE_PORT: bool = Field(
        True,
        description="each worker of `python -m service` listens on its own socket (SO_REUSEPORT), so the "
        "kernel spreads connections evenly; false: one socket shared by all, as uvicorn does",
    )
    PIN_WORKERS: bool = Field(
        False,
        description="each worker of `python -m service` runs on a core of its own, where each has one: as many "
        "workers as the CPUs it may run on, one onnxruntime thread each, never under a CPU quota (whose CPUs "
        "other containers share). Off: a worker that the kernel gave more connections than the others may "
        "then use no idle core but its own",
    )
    INTRA_OP_THREADS: int = Field(
        0,
        ge=0,
        description="onnxruntime threads per inference in each worker (0: the worker's share of the cores; "
        "one worker alone: onnxruntime's default, every core)",
    )
    DECODE_THREADS: int = Field(
        0, ge=0, description="images decoded at once per worker (0: its share of the cores, at least 2)"
    )
    CUDA_TF32: bool = Field(False, description="TF32 matmuls and convolutions on CUDA (faster, ~1e-3 off)")
    CUDA_MEM_LIMIT_BYTES: int = Field(0, ge=0, description="cap on onnxruntime's CUDA arena (0: no cap)")
    CUDA_ARENA_EXTEND: Literal["kSameAsRequested", "kNextPowerOfTwo"] = Field(
        "kSameAsRequested", description="how the CUDA arena grows; kSameAsRequested keeps it near what is used"
    )
    CUDNN_CONV_ALGO_SEARCH: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        "HEURISTIC", description="cuDNN convolution algorithm search (EXHAUSTIVE benchmarks every new shape)"
    )
    IO_BINDING: bool = Field(True, description="on CUDA: outputs bound to host memory, no extra copies")
    CUDA_FIXED_BATCH: bool = Field(
        True,
        description="on CUDA: every session.run gets MAX_BATCH_SIZE rows, a smaller batch padded with zeros, a "
        "larger one (a v2 request of more images) run in parts of that size, since onnxruntime plans its "
        "convolutions again (cuDNN's heuristics, 30 ms a run on an H100) whenever the "
        "batch size changes. Off: a large model's padding may cost more GPU time than that",
    )
    CUDA_BLOCKING_SYNC: bool = Field(
        False,
        description="on CUDA: a run waits for the GPU asleep, not spinning on a core as CUDA does by default "
        "(one H100 run: 1.07x the req/s, p99 170 vs 819 ms, at 64 connections)",
    )
    CUDA_GRAPH: bool = Field(
        False,
        description="on CUDA with CUDA_FIXED_BATCH: capture a run's kernels once as a CUDA graph and replay it, "
        "one launch a run instead of one a kernel (a padded run of the default model is about 1.6 ms, mostly "
        "launches). Runs then take turns on buffers bound once. On an H100: 0.83 vs 1.56 ms a padded run, the "
        "service at 64 connections unchanged (1,473 req/s)",
    )

    GRPC_PORT: int = Field(
        8001, ge=0, le=65535, description="port of the Open Inference Protocol over gRPC (Triton's; 0 turns it off)"
    )
    GRPC_HOST: str | None = Field(
        None, description="address gRPC listens on (default: the --host of `python -m service`, else 127.0.0.1)"
    )

    MAX_BATCH_SIZE: int = Field(
        16,
        ge=1,
        description="largest micro-batch; 1 turns batching off. On CUDA also the rows of every run (CUDA_FIXED_BATCH)",
    )
    MAX_WAIT_MS: float = Field(
        0.0,
        ge=0,
        description="the most a batch waits for requests still being decoded (0: it never waits; a batch takes "
        "what queued while the last one ran)",
    )
    QUEUE_SIZE: int = Field(
        256, ge=1, description="requests in progress (decoding or waiting) per worker before 503 + Retry-After"
    )
    MODEL_TIMEOUT_S: float = Field(
        30,
        gt=0,
        le=86400,
        description="the most a request waits for the model, from its admission (decoding, queue and run): past "
        "it, 504. A run that goes on longer (a hung GPU) makes the worker unready and refuse with 503 until it "
        "ends; the shared session's process is restarted, and so is a worker of several on its own session's run "
        "past twice this",
    )

    MAX_BODY_BYTES: int = Field(16 * 1024 * 1024, ge=1, description="request body limit (413 past it)")
    MAX_BODY_BYTES_IN_FLIGHT: int = Field(
        512 * 1024 * 1024,
        ge=1,
        description="bytes of request bodies one worker holds at once, being read or read, until each request is "
        "answered; past it, 503 + Retry-After (at least MAX_BODY_BYTES)",
    )
    BODY_READ_TIMEOUT_S: float = Field(30, gt=0, description="408 when a request body stalls this long")
    BODY_MIN_RATE: float = Field(
        1000,
        ge=0,
        description="408 when a request body, past its first BODY_READ_TIMEOUT_S, arrives slower on average than "
        "this many bytes a second (0: no floor)",
    )
    HEADER_TIMEOUT_S: float = Field(
        10,
        gt=0,
        le=3600,  # grpc takes it in milliseconds as a C int
        description="`python -m service` closes a connection whose request line and headers take longer than this, "
        "from connecting or from the request's first byte, and a gRPC one without its preface by then: idle or "
        "trickling clients cannot hold every connection",
    )
    SEND_TIMEOUT_S: float = Field(
        30,
        gt=0,
        description="`python -m service` closes a connection whose client has read nothing of its answer for this "
        "long: the answer would stay in the worker's memory, and the connection open, for as long as it liked",
    )
    MAX_CONNECTIONS: int = Field(
        1000, ge=1, description="open connections per worker of `python -m service`; past it, 503 at once"
    )
    SHUTDOWN_TIMEOUT_S: float = Field(
        10, ge=0, description="on SIGTERM, how long `python -m service` lets requests in flight finish"
    )
    MAX_IMAGES_PER_REQUEST: int = Field(
        64, ge=1, description="images (v2 FP32 rows or BYTES elements) one request may carry (413 past it)"
    )
    MAX_IMAGE_PIXELS: int = Field(40_000_000, ge=1, description="images with more pixels are refused undecoded")
    MAX_REQUEST_PIXELS: int = Field(
        0,
        ge=0,
        description="pixels the images of one v2 request may decode to in all (a baseline JPEG counts at the "
        "reduced scale it is decoded at, a progressive one in full), read from their headers: past it, 413 before "
        "any is decoded (0: twice MAX_IMAGE_PIXELS; else at least MAX_IMAGE_PIXELS)",
    )
    RESIZE: Literal["letterbox", "stretch"] = Field(
        "letterbox", description="letterbox: keep aspect, pad with the image's mean colour; stretch: ignore aspect"
    )
    ALPHA_BACKGROUND: tuple[int, int, int] = Field((255, 255, 255), description="colour under transparent pixels")

    TOP_K: int = Field(5, ge=1, description="classes returned when top_k is not given")
    STORE: Literal["disk", "redis", "memory"] = Field(
        "disk",
        description="where predictions are kept for their URLs: disk (every worker of a host), redis "
        "(several hosts) or memory (one process)",
    )
    STORE_DIR: Path | None = Field(
        None,
        description="the disk store's directory; unset, `python -m service` makes one for its workers "
        "(in /dev/shm where it has room, else the temp directory), removed at exit",
    )
    REDIS_URL: str = Field("redis://localhost:6379/0", description="the shared store when STORE=redis")
    STORE_MAX_ITEMS: int = Field(1000, ge=1, description="predictions kept for GET /v1/predictions/{id}")
    STORE_MAX_BYTES: int = Field(
        512 * 1024 * 1024,
        ge=1 << 20,
        description="bytes the disk or memory store may hold; oldest go first. The disk store's file "
        "grows to at most twice this plus 64 MiB (LMDB's map: room for the pages it frees and reuses)",
    )
    STORE_TTL_S: float = Field(
        3600, gt=0, le=10 * 365 * 86400, description="seconds a stored prediction lives (at most ten years)"
    )
    STORE_WRITER: Literal["auto"] | bool = Field(
        "auto",
        description="the workers of `python -m service` send their disk-store writes to one process of its "
        "own, so that none waits for the file's write lock while another worker holds it. auto: on where they "
        "share a session (SHARED_SESSION: a GPU host), off on the CPU, where it cost about 0.3 ms of CPU a "
        "prediction and measured no gain on 2 cores; false: each worker writes itself",
    )
    STORE_PENDING_WRITES: int = Field(
        8,
        ge=0,
        description="stores that may finish after their answer, per worker; past it a request waits for "
        "its own (0: every answer waits)",
    )
    STORE_WRITE_WAIT_S: float = Field(
        2.0, ge=0, description="how long a GET of a just-made id waits for its store to finish, before 404"
    )
    STORE_TIMEOUT_S: float = Field(
        5.0,
        gt=0,
        description="a store read or write that takes longer fails: a GET answers 503, and for the next 5 s "
        "predictions are answered without overlay URLs rather than wait for a store that is down (above the "
        "disk store writer's 2 s hand-back, so that its slowest writes still count)",
    )
    STORE_IMAGE_MAX_SIZE: int = Field(
        1024, ge=16, description="longest side overlays are drawn at (a stored upload is decoded at most this large)"
    )

    OVERLAY_ALPHA: float = Field(0.5, ge=0, le=1, description="heatmap opacity over the photo")
    OVERLAY_COLORMAP: Literal["viridis", "turbo", "jet"] = "viridis"
    OVERLAY_PNG_COMPRESSION: int = Field(
        1, ge=0, le=9, description="overlay PNGs: 1 is the fast encoder (fpng on x86-64); 0, 2-9 are zlib levels"
    )
    OVERLAY_QUALITY: int = Field(85, ge=1, le=100, description="quality of WebP and JPEG overlays")
    OVERLAY_CACHE_BYTES: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="rendered overlays, by parameter set, and the decoded images they are drawn on, kept per "
        "worker (0: off)",
    )

    API_KEY: str | None = Field(
        None, description="when set, every route but health and metrics needs 'Authorization: Bearer <key>'"
    )
    PREVIOUS_API_KEYS: list[str] = Field(
        default_factory=list,
        description='keys still accepted beside API_KEY while clients move to it (rotation), e.g. ["old-key"]; '
        "URLs signed under them open too. Needs API_KEY",
    )
    SIGNED_URLS: bool = Field(
        True,
        description="with API_KEY set, the overlay URLs /v1/predict returns carry a signature (expires, signature) "
        "that opens that prediction and its overlays without the key until it leaves the store (STORE_TTL_S), so "
        "<img> tags can show them; false: those URLs need the key too",
    )
    PUBLIC_DOCS: bool = Field(
        True, description="/docs, /redoc and /openapi.json open even with API_KEY set (false: they need the key)"
    )
    VIEWER: bool = Field(True, description="the attention viewer page at / (it uses the API, with the key if set)")
    CORS_ORIGINS: list[str] = Field(
        default_factory=list, description='origins allowed by CORS, e.g. ["https://grafana.example"]'
    )
    PUBLIC_URL: str | None = Field(None, description="base of the overlay URLs (default: from the request)")

    @field_validator("SHARED_SESSION", "STORE_WRITER", mode="before")
    @classmethod
    def _auto_in_any_case(cls, value: Any) -> Any:
        """AUTO and Auto as well, as TRUE and True are booleans."""
        return "auto" if isinstance(value, str) and value.strip().lower() == "auto" else value

    @model_validator(mode="after")
    def _previous_keys_need_a_key(self) -> Settings:
        if self.PREVIOUS_API_KEYS and not self.API_KEY:
            raise ValueError("PREVIOUS_API_KEYS are accepted beside API_KEY, which is not set")
        if "" in self.PREVIOUS_API_KEYS:
            raise ValueError("PREVIOUS_API_KEYS holds an empty key")
        return self

    @model_validator(mode="after")
    def _a_request_holds_an_image(self) -> Settings:
        if self.MAX_REQUEST_PIXELS and self.MAX_REQUEST_PIXELS < self.MAX_IMAGE_PIXELS:
            raise ValueError("MAX_REQUEST_PIXELS is below MAX_IMAGE_PIXELS: a request could not hold one image")
        return self

    @model_validator(mode="after")
    def _a_worker_holds_a_body(self) -> Settings:
        if self.MAX_BODY_BYTES_IN_FLIGHT < self.MAX_BODY_BYTES:
            raise ValueError("MAX_BODY_BYTES_IN_FLIGHT is below MAX_BODY_BYTES: a worker could not hold one body")
        return self

    def request_pixels(self) -> int:
        return self.MAX_REQUEST_PIXELS or 2 * self.MAX_IMAGE_PIXELS

    def api_keys(self) -> list[str]:
        """The keys a client may send: API_KEY first (URLs are signed under it), then the previous ones."""
        return [self.API_KEY, *self.PREVIOUS_API_KEYS] if self.API_KEY else []

    def workers(self) -> int:
        return self.WORKERS or cores()

    def shared_session(self) -> bool:
        """Whether `python -m service` runs one session for its workers (SHARED_SESSION)."""
        if self.SHARED_SESSION != "auto":
            return self.SHARED_SESSION
        from service.model import runs_on_cuda  # onnxruntime, only where it is asked

        return self.workers() > 1 and runs_on_cuda(self.PROVIDERS)

    def store_writer(self) -> bool:
        """Whether `python -m service` starts a process that makes the disk store's writes (STORE_WRITER)."""
        if self.STORE != "disk" or self.workers() < 2:
            return False
        return self.shared_session() if self.STORE_WRITER == "auto" else self.STORE_WRITER

    def intra_op_threads(self) -> int:
        if self.INTRA_OP_THREADS or self.workers() == 1:
            return self.INTRA_OP_THREADS
        # Left at 0, onnxruntime pins its threads to cores 1..n-1, the same cores in every worker
        # process; an explicit count is not pinned. Each worker gets its share of the cores.
        return max(1, self.share())

    def pinned(self) -> bool:
        """Whether `python -m service` gives each worker a core of its own (PIN_WORKERS)."""
        if not (self.PIN_WORKERS and hasattr(os, "sched_setaffinity")):
            return False
        return 1 < self.workers() == len(os.sched_getaffinity(0)) and self.intra_op_threads() == 1

    def decode_threads(self) -> int:
        return self.DECODE_THREADS or max(2, self.share())

    def share(self) -> int:
        """Cores per worker."""
        return cores() // self.workers()

    def cuda_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "use_tf32": int(self.CUDA_TF32),
            "arena_extend_strategy": self.CUDA_ARENA_EXTEND,
            "cudnn_conv_algo_search": self.CUDNN_CONV_ALGO_SEARCH,
        }
        if self.CUDA_MEM_LIMIT_BYTES:
            options["gpu_mem_limit"] = self.CUDA_MEM_LIMIT_BYTES
        return options
