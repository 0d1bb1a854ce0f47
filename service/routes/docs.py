"""/docs (Swagger UI) and /redoc, with their scripts served by the app itself: they work offline.

The assets come from the pinned fastapi-offline package, which ships Swagger UI's and ReDoc's
release bundles. With WARN_PUBLIC_DOCS=false and an API key, the pages and /openapi.json need the key.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"


def mount_assets(app: FastAPI) -> None:
    app.mount(ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")


def urls(request: Request) -> tuple[str, str]:
    """/openapi.json and the assets' folder, under the proxy's path prefix if there is one."""
    base = request.scope.get("root_path", "")
    return f"{base}/openapi.json", f"{base}{ASSETS}"


def router(app: FastAPI, serve_openapi: bool) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    if serve_openapi:  # otherwise FastAPI serves it, unguarded

        @r.get("/openapi.json")
        async def openapi() -> JSONResponse:
            return JSONResponse(app.openapi())

    @r.get("/docs")
    async def docs(request: Request) -> HTMLResponse:
        spec, assets = urls(request)
        return get_swagger_ui_html(
            openapi_url=spec,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon.png",
        )

    @r.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        spec, assets = urls(request)
        return get_redoc_html(
            openapi_url=spec,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{assets}/redoc.standalone.js",
            redoc_favicon_url=f"{assets}/favicon.png",
            with_google_fonts=False,
        )

    return r
