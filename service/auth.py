"""API keys: checking a bearer token against them, and URLs signed under them.

`WARN_API_KEY` is the key clients send; `WARN_PREVIOUS_API_KEYS` are keys still accepted while clients
move to a new one, so that a key can be rotated without a cut-over.

An `<img>` tag cannot send `Authorization`, so with a key set a dashboard could not show an overlay.
With `WARN_SIGNED_URLS`, `/v1/predict` puts `expires` and `signature` on each URL it returns: an HMAC of
the prediction id and the expiry time, under a key derived from the API key. Any worker or host with the
same key checks it without shared state, and it opens that one prediction (its JSON and every overlay,
with any drawing parameters) until it expires with the store (`WARN_STORE_TTL_S`). A URL signed under a
previous key opens as long as that key is listed; dropping a key revokes every URL signed under it.
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


def key_matches(token: str, keys: list[str]) -> bool:
    """Whether `token` is one of `keys`, compared with each in constant time."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` value, else None."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class UrlSigner:
    """Signs under the first of `api_keys` (the current key) and accepts signatures under any of them."""

    def __init__(self, api_keys: list[str], ttl_s: float) -> None:
        self._keys = [hmac.new(k.encode(), PURPOSE, hashlib.sha256).digest() for k in api_keys]
        self.ttl_s = ttl_s

    @staticmethod
    def _signature(key: bytes, prediction_id: str, expires: int) -> str:
        mac = hmac.new(key, f"{prediction_id}\n{expires}".encode(), hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def query(self, prediction_id: str, now: float | None = None) -> str:
        """The query string that opens `prediction_id` until the store lets it go."""
        expires = math.ceil((time.time() if now is None else now) + self.ttl_s)
        return f"expires={expires}&signature={self._signature(self._keys[0], prediction_id, expires)}"

    def check(self, prediction_id: str, expires: int, signature: str, now: float | None = None) -> None:
        """Raises Unauthorized unless `signature` is this prediction's, for `expires`, and that is not past."""
        made = [self._signature(key, prediction_id, expires) for key in self._keys]
        if not key_matches(signature, made):
            raise Unauthorized(
                "the URL's signature does not match this prediction and expiry time "
                "(altered, from another prediction, or signed under a key no longer accepted)"
            )
        if (time.time() if now is None else now) > expires:
            raise Unauthorized(f"the URL's signature expired at {expires} (Unix time); predict again for a new one")
