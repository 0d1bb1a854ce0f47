"""Checkpoints: a plain state dict plus JSON-able metadata, loaded without unpickling objects."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from models.warn import WARN, WARNConfig

FORMAT = "warn-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or not a WARN checkpoint."""


def save(path: str | Path, model: WARN, **meta: Any) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # the backbone is in the config; its attended stages' strides are recorded for readers without torch
    payload = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "strides": model.strides,
        "state_dict": state,
        **meta,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a WARN checkpoint (expected format {FORMAT!r})")
    return payload


def load(path: str | Path) -> tuple[WARN, dict[str, Any]]:
    """The model in eval mode and the checkpoint's metadata (everything but the weights)."""
    payload = read(path)
    try:
        model = WARN(WARNConfig.from_dict(payload["config"]))
        model.load_state_dict(payload["state_dict"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} does not match the WARN architecture: {e}") from e
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "optimizer", "scheduler")}
    return model.eval(), meta
