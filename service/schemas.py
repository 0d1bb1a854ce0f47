"""Response bodies, declared so /docs shows their real shapes and clients can be generated."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every error, as the Open Inference Protocol also specifies it."""

    error: str = Field(description="what was wrong")
    code: str = Field(description="machine-readable: invalid_request, unsupported_media_type, ...")
    detail: list | None = Field(None, description="validation errors, where there are several")


class ModelRef(BaseModel):
    name: str
    version: str


class ClassScore(BaseModel):
    label: str
    index: int
    probability: float


class LayerResult(BaseModel):
    name: str = Field(description="attention_<i>, or backbone")
    global_gate: float = Field(description="the weight the global gate gives this layer")
    top_class: ClassScore = Field(description="this layer's own hypothesis")
    index: int | None = Field(None, description="attended layers only: 0 is the shallowest")
    stride: int | None = Field(None, description="attended layers only")
    gates: list[float] | None = Field(None, description="attended layers only: the layer gate over its heads")


class ImageSize(BaseModel):
    width: int
    height: int


class Prediction(BaseModel):
    id: str
    model: ModelRef
    top_k: list[ClassScore]
    global_gates: dict[str, float]
    layers: list[LayerResult]
    image: ImageSize
    probabilities: dict[str, float] | None = Field(None, description="with probabilities=true")
    attention_urls: dict[str, str] | None = Field(
        None, description="overlay URLs: combined and each layer (null while the prediction store is unreachable)"
    )
    warnings: list[str] | None = Field(None, description="what this answer lacks, and why")
    timings_ms: dict[str, float] | None = None


class AttendedLayer(BaseModel):
    index: int
    stride: int
    pointing_game: float | None = Field(
        None, description="share of test images whose map's peak falls on the object (None: not measured)"
    )


class PointingGame(BaseModel):
    """How often each map points at the object, measured by warn-eval before export."""

    layers: list[float | None]
    combined: float | None
    tolerance_px: int | None


class InputSize(BaseModel):
    height: int
    width: int


class Batching(BaseModel):
    max_batch_size: int
    max_wait_ms: float
    queue_size: int
    max_images_per_request: int


class ModelDescription(BaseModel):
    name: str
    version: str
    providers: list[str]
    classes: list[str]
    input_size: InputSize
    resize: str
    attended_layers: list[AttendedLayer]
    pointing_game: PointingGame
    layer_names: list[str]
    batching: Batching
    metadata: dict


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(BaseModel):
    name: str
    ready: bool


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[float] | None = None
    parameters: dict | None = None


class InferResponse(BaseModel):
    """The JSON part of an inference answer; binary outputs follow it (Inference-Header-Content-Length)."""

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OutputTensor]


# What each error status looks like, as the service really answers it (tests/serving/test_api.py checks)
ERROR_EXAMPLES: dict[int, dict] = {
    400: {"error": "unknown output 'logits'; this model has probabilities, ...", "code": "invalid_request"},
    401: {"error": "missing or wrong API key: send 'Authorization: Bearer <key>'", "code": "unauthorized"},
    404: {
        "error": "no prediction 'abc': unknown, or expired (predictions are kept 3600 s)",
        "code": "not_found",
    },
    413: {"error": "request body is larger than the limit of 16777216 bytes", "code": "body_too_large"},
    415: {
        "error": "not an image in a supported format (PNG, JPEG, GIF, BMP, TIFF, WEBP, PPM, ICO)",
        "code": "unsupported_media_type",
    },
    422: {
        "error": "query.top_k: Input should be greater than or equal to 1",
        "code": "invalid_request",
        "detail": [
            {
                "type": "greater_than_equal",
                "loc": ["query", "top_k"],
                "msg": "Input should be greater than or equal to 1",
                "input": "0",
                "ctx": {"ge": 1},
            }
        ],
    },
    500: {"error": "internal server error (logged); please report it", "code": "internal_error"},
    503: {"error": "the model's queue is full (256 requests in progress); retry shortly", "code": "overloaded"},
    504: {
        "error": "no answer from the model within 30 s of this request's admission (the model is hung, or far "
        "behind); retry later",
        "code": "model_timeout",
    },
}


def errors(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` for these error statuses, each with the error body and a real example."""
    meaning = {
        400: "malformed request",
        401: "missing or wrong API key",
        404: "unknown prediction or model",
        413: "body, image or batch over its limit",
        415: "not an image in a supported format",
        422: "invalid image or parameter",
        500: "unexpected error (logged)",
        503: "queue full, or the model session or prediction store unavailable: retry after Retry-After seconds",
        504: "no answer from the model within WARN_MODEL_TIMEOUT_S",
    }
    return {
        s: {
            "model": ErrorBody,
            "description": meaning[s],
            "content": {"application/json": {"example": ERROR_EXAMPLES[s]}},
        }
        for s in statuses
    }
