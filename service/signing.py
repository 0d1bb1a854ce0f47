"""Signed URLs: a stored prediction's overlays, readable without the API key by whoever holds its URL.

An `<img>` tag cannot send `Authorization`, so with `WARN_API_KEY` set a dashboard could not show an
overlay. With `WARN_SIGNED_URLS`, `/v1/predict` puts `expires` and `signature` on each URL it returns:
an HMAC of the prediction id and the expiry time, under a key derived from the API key. Any worker or
host with the same API key checks it without shared state, and it opens that one prediction (its JSON
and every overlay, with any drawing parameters) until it expires with the store (`WARN_STORE_TTL_S`).
Changing the API key revokes every signed URL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import time

from service.errors import Unauthorized

# Keeps the API key itself out of every signature: a signing key derived for this purpose only.
PURPOSE = b"warn-serve signed prediction urls v1"


class UrlSigner:
    def __init__(self, api_key: str, ttl_s: float) -> None:
        self._key = hmac.new(api_key.encode(), PURPOSE, hashlib.sha256).digest()
        self.ttl_s = ttl_s

    def _signature(self, prediction_id: str, expires: int) -> str:
        mac = hmac.new(self._key, f"{prediction_id}\n{expires}".encode(), hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def query(self, prediction_id: str, now: float | None = None) -> str:
        """The query string that opens `prediction_id` until the store lets it go."""
        expires = math.ceil((time.time() if now is None else now) + self.ttl_s)
        return f"expires={expires}&signature={self._signature(prediction_id, expires)}"

    def check(self, prediction_id: str, expires: int, signature: str, now: float | None = None) -> None:
        """Raises Unauthorized unless `signature` is this prediction's, for `expires`, and that is not past."""
        if not hmac.compare_digest(signature.encode(), self._signature(prediction_id, expires).encode()):
            raise Unauthorized(
                "the URL's signature does not match this prediction and expiry time "
                "(altered, from another prediction, or signed under another API key)"
            )
        if (time.time() if now is None else now) > expires:
            raise Unauthorized(f"the URL's signature expired at {expires} (Unix time); predict again for a new one")
