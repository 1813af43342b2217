"""Who may call the generation endpoints (an API key), and from which web origins (CORS).

With ``--api-key`` (one or several; GPTOSS_API_KEY, comma-separated) every ``/v1/*`` and
``/generate`` request needs ``Authorization: Bearer KEY``: a 401 in OpenAI's error shape
otherwise. Each key is a tenant: the prompt cache keys its entries by it, so one tenant cannot
read another's answers, or learn by timing or ``X-Cache`` what another asked. ``/health``,
``/metrics``, ``/stats`` and the playground's page stay open for probes, scrapes and browsers.
Browsers get CORS headers only for the origins ``--allowed-origins`` names.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from app.http.errors import ApiError

PROTECTED_PREFIXES = ("/v1/", "/generate")
# What a page on an allowed origin may send and read (the server's provenance headers included).
CORS_REQUEST_HEADERS = "Authorization, Content-Type, X-Request-Id, X-Request-Timeout"
CORS_EXPOSED_HEADERS = "X-Request-Id, X-Cache, X-Cache-Key, X-Prompt-Version, Retry-After, Server-Timing"


def tenant_name(key: str) -> str:
    """How a key is known inside the server (the cache, never a log): not the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [key.encode() for key in keys]

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def tenant(self, path: str, authorization: str | None) -> str | None:
        """The caller's tenant for a protected path (None when no key is configured, or the path
        is open); an ApiError 401 when the key is missing or wrong."""
        if not self._keys or not path.startswith(PROTECTED_PREFIXES):
            return None
        scheme, _, given = (authorization or "").partition(" ")
        offered = given.strip().encode()
        # Every key is compared, in constant time each: the time taken says nothing of which
        # key, or how much of one, a caller got right.
        matches = [hmac.compare_digest(offered, key) for key in self._keys]
        if scheme.lower() != "bearer" or not offered or not any(matches):
            raise ApiError(
                401,
                "a valid API key is needed: send Authorization: Bearer <key>",
                code="invalid_api_key",
                headers={"WWW-Authenticate": 'Bearer realm="gptoss"'},
            )
        return tenant_name(given.strip())


def cors_headers(origin: str | None, allowed: Iterable[str], preflight: bool) -> dict[str, str]:
    """The CORS headers for a request from ``origin``: none unless it is allowed."""
    allowed = tuple(allowed)
    if origin is None or not (origin in allowed or "*" in allowed):
        return {}
    headers = {
        "Access-Control-Allow-Origin": origin,
        "Vary": "Origin",
        "Access-Control-Expose-Headers": CORS_EXPOSED_HEADERS,
    }
    if preflight:
        headers |= {
            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": CORS_REQUEST_HEADERS,
            "Access-Control-Max-Age": "600",
        }
    return headers
