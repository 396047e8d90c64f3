"""Prometheus metrics of the HTTP layer under the names vLLM's server exports (those of
prometheus-fastapi-instrumentator, so its dashboards and alerts read them): requests by route,
method and status class, and how long they took; beside them the process's own metrics
(memory, CPU time, open files, garbage collections), which a bare registry lacks."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_DURATION_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class HttpMetricFamilies:
    """The families on one registry, made once (a middleware stack may be built more than once)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "http_requests",
            "HTTP requests by route template (none: no route matched), method and status class.",
            ["handler", "method", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "From a request's arrival to its response's last byte (a stream's whole length), by route.",
            ["handler", "method"],
            buckets=_DURATION_BUCKETS_S,
            registry=registry,
        )
        # Clients refused for what, or how slowly, they sent (`client_limits.py`): the header ones
        # never reach the app, so `http_requests` never sees them.
        self.client_refusals = Counter(
            "inferd_http_client_refusals",
            "Requests refused for their client's sending: header_too_large (431), header_timeout and "
            "body_timeout (408).",
            ["reason"],
            registry=registry,
        )
        ProcessCollector(registry=registry)
        GCCollector(registry=registry)
        PlatformCollector(registry=registry)


class HttpMetrics:
    """ASGI middleware counting every HTTP request once its response has ended (or the app failed
    without one: a 500). The route is the matched template (``/v2/models/{name}/infer``), so
    the labels stay few whatever paths clients send."""

    def __init__(self, app: ASGIApp, families: HttpMetricFamilies) -> None:
        self.app = app
        self.families = families

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recorded(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recorded)
        finally:
            handler = _route_template(scope)
            method = scope["method"]
            self.families.requests.labels(handler, method, f"{status // 100}xx").inc()
            self.families.duration.labels(handler, method).observe(time.perf_counter() - start)


def _leaf_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """The routes themselves, in order. FastAPI from 0.16x keeps an included router as one entry
    (its ``original_router``) that picks among its routes only as it handles a request; the
    servers include theirs without a prefix, so each route's path is its whole template."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _leaf_routes(included.routes)
        else:
            yield route


def _route_template(scope: Scope) -> str:
    """The template of the route that served the request, or would have: one refused before
    routing (a 413 for its body, a 401 for its key) counts under its route all the same; "none"
    where no route matches the path."""
    route = scope.get("route")
    if route is None:
        routes = _leaf_routes(getattr(getattr(scope.get("app"), "router", None), "routes", ()))
        matches = [(candidate.matches(scope)[0], candidate) for candidate in routes]
        # A route of the path for another method (a 405) where none takes the request's method.
        route = next((r for m, r in matches if m is Match.FULL), None) or next(
            (r for m, r in matches if m is Match.PARTIAL), None
        )
    return getattr(route, "path", None) or "none"
