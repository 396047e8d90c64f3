"""A request body size limit, enforced before any route parses the body.

A declared `Content-Length` over the limit is refused at once; a chunked body is read up to the
limit and replayed to the app, so an endless upload cannot exhaust memory either. The 413 comes in
the error shape of the protocol the path belongs to.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import Response
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferd.server.errors import ApiError, PayloadTooLargeError

DEFAULT_MAX_BODY_BYTES = 64 * 2**20

# The error response of the protocol that serves a path.
PathErrorRenderer = Callable[[str, ApiError], Response]


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, render: PathErrorRenderer) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None:
            if declared > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        buffered = await self._read_bounded(receive)
        if buffered is None:
            await self._refuse(scope, receive, send)
            return
        await self.app(scope, replay_body(buffered, receive), send)

    async def _read_bounded(self, receive: Receive) -> list[Message] | None:
        """The body messages, or None once they pass the limit (a disconnect ends the read early)."""
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return None
            if not message.get("more_body", False):
                return messages

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLargeError(f"the request body exceeds the limit of {self.max_bytes} bytes")
        response = self.render(get_route_path(scope), error)  # under --root-path, the routes' path
        response.headers["Connection"] = "close"  # the rest of the body is not read
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def read_body(receive: Receive) -> tuple[list[Message], bytes]:
    """A body's messages (the last one a disconnect where the client left while sending it), and
    the bytes they carry; bounded by ``BodySizeLimit`` outside."""
    messages: list[Message] = []
    chunks: list[bytes] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, b"".join(chunks)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return messages, b"".join(chunks)


def replay_body(messages: list[Message], receive: Receive) -> Receive:
    """A receive that gives ``messages`` (a body already read) first, then whatever comes after."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
