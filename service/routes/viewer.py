"""The attention viewer at `/`: static HTML, CSS and JavaScript over the public API, no build step, no CDN."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

PAGE = Path(__file__).resolve().parent.parent / "viewer"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def viewer() -> FileResponse:
    # the page holds no data: the API calls it makes carry the key the person pastes
    return FileResponse(PAGE / "index.html", headers={"Cache-Control": "no-cache"})


def mount_assets(app: FastAPI) -> None:
    app.mount("/viewer", StaticFiles(directory=PAGE), name="viewer")
