"""The service's own log lines, next to uvicorn's."""

from __future__ import annotations

import logging

log = logging.getLogger("service")


def show_service_logs() -> None:
    """The service's own lines (model, provider, gRPC address, errors) next to uvicorn's, in its format;
    uvicorn configures only its own loggers."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
