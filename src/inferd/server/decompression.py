"""Request bodies sent compressed (``Content-Encoding: gzip`` or ``deflate``), as Triton's HTTP
client sends them with ``request_compression_algorithm``: inflated before any route reads them.

Inside the body size limit, which bounds the compressed body; the inflated one is held to the same
limit, so a small body that would inflate to gigabytes is a 413, never a memory blow-up. Another
encoding, or data that does not inflate, is a 400 in the protocol's error shape (a route would
otherwise report the compressed bytes as bad JSON)."""

from __future__ import annotations

import zlib

from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferd.server.errors import ApiError, InvalidRequestError, PayloadTooLargeError
from inferd.server.limits import PathErrorRenderer, replay_body

# zlib's window bits for each encoding, tried in turn: gzip's header; deflate as HTTP means it
# (zlib's format), then the raw stream some clients send under that name.
_WINDOW_BITS = {"gzip": (31,), "x-gzip": (31,), "deflate": (15, -15)}
_PLAIN = ("", "identity")


class RequestDecompression:
    def __init__(self, app: ASGIApp, max_bytes: int, render: PathErrorRenderer) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        encoding = _header(scope, b"content-encoding") if scope["type"] == "http" else None
        if encoding is None or encoding in _PLAIN:
            await self.app(scope, receive, send)
            return
        messages = await _read_body(receive)  # bounded by the size limit outside
        try:
            if encoding not in _WINDOW_BITS:
                raise InvalidRequestError(
                    f"Content-Encoding {encoding!r} is not supported: send the body as it is, or gzip "
                    "or deflate"
                )
            body = b"".join(message.get("body", b"") for message in messages)
            inflated = _inflate(body, _WINDOW_BITS[encoding], self.max_bytes)
        except ApiError as error:
            response = self.render(get_route_path(scope), error)
            await response(scope, receive, send)
            return
        headers = [(name, value) for name, value in scope["headers"]
                   if name not in (b"content-encoding", b"content-length")]  # fmt: skip
        headers.append((b"content-length", str(len(inflated)).encode()))
        plain: Message = {"type": "http.request", "body": inflated, "more_body": False}
        await self.app({**scope, "headers": headers}, replay_body([plain], receive), send)


def _inflate(body: bytes, window_bits: tuple[int, ...], max_bytes: int) -> bytes:
    for attempt, bits in enumerate(window_bits, 1):
        inflater = zlib.decompressobj(bits)
        try:
            inflated = inflater.decompress(body, max_bytes + 1)
        except zlib.error as exc:
            if attempt < len(window_bits):
                continue
            raise InvalidRequestError(
                f"the request body does not inflate as its Content-Encoding says: {exc}"
            ) from None
        if len(inflated) > max_bytes:
            raise PayloadTooLargeError(f"the request body inflates past the limit of {max_bytes} bytes")
        if not inflater.eof:
            raise InvalidRequestError(
                "the request body does not inflate as its Content-Encoding says: truncated"
            )
        return inflated
    raise AssertionError("every encoding has window bits to try")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1").strip().lower())
    return None


async def _read_body(receive: Receive) -> list[Message]:
    messages: list[Message] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return messages
        messages.append(message)
        if not message.get("more_body", False):
            return messages
