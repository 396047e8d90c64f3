"""Request bodies sent compressed (``Content-Encoding: gzip`` or ``deflate``), as Triton's HTTP
client sends them with ``request_compression_algorithm``: inflated before any route reads them.

Inside the body size limit, which bounds the compressed body; the inflated one is held to the same
limit, so a small body that would inflate to gigabytes is a 413, never a memory blow-up, and it is
inflated in a worker thread, so a large one never holds up the event loop (the streams of other
requests). gzip's members may follow one another. Another encoding, data that does not inflate, or
bytes after it are a 400 in the protocol's error shape (a route would otherwise report the
compressed bytes as bad JSON). A client that leaves while its body is read is passed on as such."""

from __future__ import annotations

import asyncio
import zlib

from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferd.server.errors import ApiError, InvalidRequestError, PayloadTooLargeError
from inferd.server.limits import PathErrorRenderer, read_body, replay_body

# zlib's window bits for each encoding, tried in turn: gzip's header; deflate as HTTP means it
# (zlib's format), then the raw stream some clients send under that name.
_GZIP_BITS = 31
# A body is fed to zlib this much at a time; more gzip members than this are refused (a real one
# has a few; thousands of empty ones would make a small body cost a lot).
_PIECE_BYTES = 64 * 1024
_MAX_MEMBERS = 1024
_WINDOW_BITS = {"gzip": (_GZIP_BITS,), "x-gzip": (_GZIP_BITS,), "deflate": (15, -15)}
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
        messages, body = await read_body(receive)  # bounded by the size limit outside
        if messages[-1]["type"] != "http.request":  # gone: the app finds out as it reads
            await self.app(scope, replay_body(messages, receive), send)
            return
        try:
            if encoding not in _WINDOW_BITS:
                raise InvalidRequestError(
                    f"Content-Encoding {encoding!r} is not supported: send the body as it is, or gzip "
                    "or deflate"
                )
            inflated = await asyncio.to_thread(_inflate, body, _WINDOW_BITS[encoding], self.max_bytes)
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
    """``body`` inflated, trying each of ``window_bits`` in turn; an empty body stays empty."""
    if not body:
        return body
    failure = ""
    for bits in window_bits:
        try:
            return _inflate_members(body, bits, max_bytes)
        except zlib.error as exc:
            failure = str(exc)
    raise InvalidRequestError(f"the request body does not inflate as its Content-Encoding says: {failure}")


def _inflate_members(body: bytes, bits: int, max_bytes: int) -> bytes:
    """gzip's members one after another (zlib's and raw deflate's one stream), each fed in pieces so
    a body of many small members costs its length, not its length squared; trailing zero bytes are
    padding, as Python's gzip takes them."""
    view = memoryview(body)
    parts, size, offset, members = [], 0, 0, 0
    while offset < len(view) and any(view[offset:]):
        members += 1
        if members > _MAX_MEMBERS:
            raise InvalidRequestError(f"the request body has more than {_MAX_MEMBERS} gzip members")
        inflater = zlib.decompressobj(bits)
        while not inflater.eof:
            if offset >= len(view):
                raise InvalidRequestError(
                    "the request body does not inflate as its Content-Encoding says: truncated"
                )
            piece = view[offset : offset + _PIECE_BYTES]
            offset += len(piece)
            part = inflater.decompress(piece, max_bytes + 1 - size)
            size += len(part)
            if size > max_bytes:
                raise PayloadTooLargeError(f"the request body inflates past the limit of {max_bytes} bytes")
            parts.append(part)
        offset -= len(inflater.unused_data)  # the next member's start, read with this piece
        if bits != _GZIP_BITS and offset < len(view):  # only gzip's members may follow one another
            raise InvalidRequestError(
                f"the request body has {len(view) - offset} bytes after its compressed data"
            )
    return b"".join(parts)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1").strip().lower())
    return None
