"""All service settings, read from WARN_* environment variables (or a .env file)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "default_model" / "model.onnx"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WARN_", env_file=".env", extra="ignore")

    MODEL_PATH: Path = Field(DEFAULT_MODEL, description="ONNX file written by warn-export")
    PROVIDERS: str = Field(
        "auto", description="'auto' (CUDA if onnxruntime offers it, else CPU) or a comma-separated provider list"
    )
    INTRA_OP_THREADS: int = Field(0, ge=0, description="onnxruntime threads per inference (0: one per core)")

    MAX_BATCH_SIZE: int = Field(32, ge=1, description="largest micro-batch; 1 turns batching off")
    MAX_WAIT_MS: float = Field(2.0, ge=0, description="how long the first request of a batch waits for others")
    QUEUE_SIZE: int = Field(256, ge=1, description="requests waiting for the model before 503 + Retry-After")

    MAX_BODY_BYTES: int = Field(16 * 1024 * 1024, ge=1, description="request body limit (413 past it)")
    MAX_IMAGE_PIXELS: int = Field(40_000_000, ge=1, description="images with more pixels are refused undecoded")
    RESIZE: Literal["letterbox", "stretch"] = Field(
        "letterbox", description="letterbox: keep aspect, pad with the image's mean colour; stretch: ignore aspect"
    )
    ALPHA_BACKGROUND: tuple[int, int, int] = Field((255, 255, 255), description="colour under transparent pixels")

    TOP_K: int = Field(5, ge=1, description="classes returned when top_k is not given")
    STORE: Literal["memory", "redis"] = Field("memory", description="where predictions are kept for their URLs")
    REDIS_URL: str = Field("redis://localhost:6379/0", description="the shared store when STORE=redis")
    STORE_MAX_ITEMS: int = Field(1000, ge=1, description="predictions kept for GET /v1/predictions/{id}")
    STORE_TTL_S: float = Field(3600, gt=0, description="seconds a stored prediction lives")
    STORE_IMAGE_MAX_SIZE: int = Field(1024, ge=16, description="longest side of the image kept for overlays")

    OVERLAY_ALPHA: float = Field(0.5, ge=0, le=1, description="heatmap opacity over the photo")
    OVERLAY_COLORMAP: Literal["viridis", "turbo", "jet"] = "viridis"

    API_KEY: str | None = Field(
        None, description="when set, every route but health and metrics needs 'Authorization: Bearer <key>'"
    )
    CORS_ORIGINS: list[str] = Field(
        default_factory=list, description='origins allowed by CORS, e.g. ["https://grafana.example"]'
    )
    PUBLIC_URL: str | None = Field(None, description="base of the overlay URLs (default: from the request)")
