"""Dependencies shared by the routes: the runtime, auth, and reading an image from a request.

All are `async def`, though none awaits: FastAPI runs a plain `def` dependency in its thread pool, a
hop there and back for every request (two per /v1/predict before, three per overlay).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.auth import bearer_token, key_matches
from service.errors import InvalidRequest, Unauthorized, UnsupportedMedia
from service.overlay import FORMATS, OverlayParams
from service.pipeline import Runtime


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def require_api_key(request: Request) -> None:
    keys = request.app.state.api_keys
    if not keys:
        return
    token = bearer_token(request.headers.get("authorization", ""))
    if token is None or not key_matches(token, keys):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")


async def require_api_key_or_signature(
    request: Request,
    expires: Annotated[
        int | None, Query(ge=0, le=10**12, description="with a signature: when it expires (Unix time)")
    ] = None,
    signature: Annotated[
        str | None,
        Query(max_length=64, description="with WARN_API_KEY set: opens this prediction without the key"),
    ] = None,
) -> None:
    """The API key, or the signature that `/v1/predict` put on this prediction's URLs (service/auth.py)."""
    if "authorization" in request.headers:  # main.py installs this only where URLs are signed
        return await require_api_key(request)
    if expires is None and signature is None:
        raise Unauthorized(
            "missing API key: send 'Authorization: Bearer <key>', or open the signed URL that /v1/predict returned"
        )
    if expires is None or signature is None:
        raise Unauthorized("a signed URL needs both 'expires' and 'signature', as /v1/predict gave them")
    request.app.state.signer.check(request.path_params["prediction_id"], expires, signature)


MAX_FORM_FIELDS = 16  # text fields beside the file; Starlette allows 1,000

IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                },
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
        "description": "An image (PNG, JPEG, GIF, BMP, TIFF, WebP, PPM, ICO) as multipart field `file`, "
        "or as the raw body with an image content type.",
    }
}


async def image_bytes(request: Request) -> bytes:
    """The encoded image of a multipart (`file`) or raw image request."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:  # one image a request: a second file was dropped without a word (the last one classified)
            form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS)
        except StarletteHTTPException as e:
            raise InvalidRequest(
                f"multipart body: {e.detail} Send one image per request, as the file field 'file' "
                "(several: a request each, or one v2 request with a BYTES tensor)"
            ) from e
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InvalidRequest("multipart body needs the image as a file field named 'file'")
        return await upload.read()
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return await request.body()
    raise UnsupportedMedia(
        f"content type {ctype or '(none)'!r} is not accepted: send multipart/form-data with a 'file' field, "
        "or the raw image with an image/* content type"
    )


ImageBytes = Annotated[bytes, Depends(image_bytes)]


async def overlay_params(
    request: Request,
    head: Annotated[
        int | None, Query(ge=0, description="one attention head; default: heads mixed by their gates")
    ] = None,
    colormap: Annotated[str | None, Query(pattern="^(viridis|turbo|jet)$", description="default: viridis")] = None,
    alpha: Annotated[float | None, Query(ge=0, le=1, description="heatmap opacity over the photo")] = None,
    max_size: Annotated[int | None, Query(ge=8, le=4096, description="longest side of the PNG")] = None,
    mode: Annotated[
        str, Query(pattern="^(overlay|heatmap)$", description="heatmap: the map alone, no photo")
    ] = "overlay",
    format: Annotated[
        str | None, Query(pattern=f"^({'|'.join(FORMATS)})$", description="png (default), webp or jpeg")
    ] = None,
) -> OverlayParams:
    s = request.app.state.settings
    return OverlayParams(  # format None: the route picks (a stored overlay's URL extension, else PNG)
        head=head,
        colormap=colormap or s.OVERLAY_COLORMAP,
        alpha=s.OVERLAY_ALPHA if alpha is None else alpha,
        max_size=max_size,
        mode=mode,
        format=format,
    )


OverlayDep = Annotated[OverlayParams, Depends(overlay_params)]
