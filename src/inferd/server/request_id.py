"""A client's own request id (the ``X-Request-Id`` header, as vLLM and gateways pass it): answered
back in the same header on every route, and the OpenAI completions' and chats' ``id`` is made from it
(or from the body's ``request_id``), so that a request can be followed through a gateway's logs.

Engine request ids stay the server's own (``Frontend.new_request_id``): two requests a client sends
with one id never share engine state.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
# Printable ASCII without spaces, not too long: an id that is echoed into a header and an answer's
# id must not carry anything else.
_ACCEPTED = re.compile(r"[\x21-\x7e]{1,256}")


def client_request_id(value: str | None) -> str | None:
    """``value`` where it is an id to answer with, else None (ignored, as a malformed header is)."""
    return value if value is not None and _ACCEPTED.fullmatch(value) else None


class EchoRequestId:
    """Sends a request's ``X-Request-Id`` back on its response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = dict(scope["headers"]).get(HEADER.encode())
        request_id = client_request_id(raw.decode("latin-1")) if raw is not None else None
        if request_id is None:
            await self.app(scope, receive, send)
            return
        header = (HEADER.encode(), request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [pair for pair in message.get("headers", []) if pair[0].lower() != HEADER.encode()]
                message = {**message, "headers": [*kept, header]}
            await send(message)

        await self.app(scope, receive, send_with_id)
