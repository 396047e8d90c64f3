"""Optional bearer-token check for the protocol routers (health and metrics stay open)."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from starlette.requests import Request

from inferd.server.errors import AuthenticationError


def require_api_key(api_key: str) -> Callable[[Request], None]:
    """A FastAPI dependency that raises AuthenticationError unless the request carries the key."""
    expected = f"Bearer {api_key}".encode()

    def check(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        # Constant-time comparison, so the key cannot be guessed byte by byte from response times.
        if not secrets.compare_digest(given, expected):
            raise AuthenticationError("a valid API key is required: send 'Authorization: Bearer <key>'")

    return check
