"""SageMaker's `POST /invocations`: one route for every kind of request, sent on to the route
that serves the body's kind, as vLLM and TGI read it: `messages` -> chat completions, `prompt` ->
completions, `inputs` -> TGI's generate (`/`, which streams with `stream: true`), `input` ->
embeddings. The rest (auth, limits, errors, streaming) is that route's."""

from __future__ import annotations

import json

from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from inferd.server.errors import InvalidRequestError
from inferd.server.limits import read_body, replay_body
from inferd.server.openai.common import error_response

INVOCATIONS_PATH = "/invocations"

# The body's field that tells its kind -> the route serving it, in the order they are tried.
ROUTE_BY_FIELD = {
    "messages": "/v1/chat/completions",
    "prompt": "/v1/completions",
    "inputs": "/",
    "input": "/v1/embeddings",
}


class SageMakerInvocations:
    """ASGI middleware: reads a `POST /invocations` body (inside the body size limit, which has
    bounded it), picks the route by its fields, and passes the request on with that path and the
    same body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or get_route_path(scope) != INVOCATIONS_PATH:
            await self.app(scope, receive, send)
            return
        messages, body = await read_body(receive)
        route = _route_for(body)
        if route is None:
            fields = ", ".join(ROUTE_BY_FIELD)
            error = InvalidRequestError(f"an invocation's body is a JSON object with one of: {fields}")
            await error_response(error)(scope, replay_body(messages, receive), send)
            return
        # In place, so the middlewares outside see the route that served it (the HTTP metrics
        # count it under that route).
        scope["path"] = scope.get("root_path", "") + route
        scope["raw_path"] = scope["path"].encode()
        await self.app(scope, replay_body(messages, receive), send)


def _route_for(body: bytes) -> str | None:
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: recursion
        return None
    if not isinstance(parsed, dict):
        return None
    # A null field is an absent one, as every route reads it: {"messages": null, "prompt": ...} is
    # a completion.
    return next((route for field, route in ROUTE_BY_FIELD.items() if parsed.get(field) is not None), None)
