"""Optional bearer-token check (``--api-key``): every HTTP path needs the key but the few in
``OPEN_PATHS``, the probes and the metrics that orchestrators and scrapers call without credentials.

It is an ASGI middleware outside the body size limit, the decompression and SageMaker's
``/invocations`` dispatch, so a request without the key is answered from its headers alone: nothing
reads, inflates or parses its body. Paths are refused unless listed open, so a new route, the
OpenAPI docs (``/docs``, ``/redoc``, ``/openapi.json``) and unknown paths need the key too.
"""

from __future__ import annotations

import os
import secrets

from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from inferd.server.errors import AuthenticationError
from inferd.server.limits import PathErrorRenderer

# The one list of paths served without the key (docs/server.md's Endpoints table says the same):
# health probes, SageMaker's ping, the version and the Prometheus metrics, as vLLM, TGI and Triton
# keep theirs open. Exact paths: anything else, a trailing slash included, needs the key.
OPEN_PATHS = frozenset({"/health", "/ping", "/version", "/metrics", "/v2/health/live", "/v2/health/ready"})


def api_key_from_environment() -> str | None:
    """The key a server takes when ``--api-key`` is not given: ``$INFERD_API_KEY``, else vLLM's
    ``$VLLM_API_KEY`` (a deployment moved over from vLLM keeps its key)."""
    return os.environ.get("INFERD_API_KEY") or os.environ.get("VLLM_API_KEY")


MISSING_KEY_MESSAGE = "a valid API key is required: send 'Authorization: Bearer <key>'"


def is_open_path(path: str) -> bool:
    """Whether ``path`` (as the routes see it, under ``--root-path`` without the prefix) is served
    without the API key."""
    return path in OPEN_PATHS


class RequireApiKey:
    """ASGI middleware: a request to a path that is not open needs ``Authorization: Bearer <key>``,
    else it gets a 401 in the error shape of the protocol serving its path (``render``)."""

    def __init__(self, app: ASGIApp, api_key: str, render: PathErrorRenderer) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Only HTTP is served (no WebSocket routes); the lifespan carries no request.
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The path the router matches with (get_route_path takes --root-path off as routing does),
        # so a path is open here exactly where it reaches an open route.
        path = get_route_path(scope)
        if is_open_path(path) or self._carries_key(scope):
            await self.app(scope, receive, send)
            return
        # Answered without reading the body: the server discards what the client still sends.
        response = self.render(path, AuthenticationError(MISSING_KEY_MESSAGE))
        await response(scope, receive, send)

    def _carries_key(self, scope: Scope) -> bool:
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        # Constant-time comparison, so the key cannot be guessed byte by byte from response times.
        return secrets.compare_digest(given, self.expected)
