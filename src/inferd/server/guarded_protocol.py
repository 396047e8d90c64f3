"""uvicorn's httptools protocol with the header limits of `ClientLimits`: a size, counted while the
headers (and a chunked body's trailers) arrive, and a deadline for them.

uvicorn gives neither: httptools buffers a header or trailer line of any length, and its keep-alive
timer, the only one it has, is cancelled by the first byte a client sends (a new connection has
none at all). A refusal is answered before any route exists to shape it, so it is plain text, as
uvicorn's own answer to a malformed request, and the connection closes. An earlier request's
answer still being written on the connection is never cut: the connection ends after it instead.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from prometheus_client import Counter
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from inferd.server.client_limits import ClientLimits

# The reasons of `inferd_http_client_refusals_total` that are counted here.
HEADER_TOO_LARGE = "header_too_large"
HEADER_TIMEOUT = "header_timeout"


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """Set `limits` and `refusals` (the family of `inferd_http_client_refusals_total`) on a
    subclass, as `guarded_http_protocol` does: uvicorn builds one protocol object per connection
    and passes nothing of ours to it."""

    limits: ClassVar[ClientLimits]
    refusals: ClassVar[Counter]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # True from a connection's opening or a request's first byte to the end of its headers.
        self._reading_headers = False
        # True from a request's first byte to its end (its body's last byte, trailers included):
        # a connection whose header deadline passes without it sent nothing, and is closed without
        # an answer (as a browser's pre-connect may be).
        self._in_request = False
        # Bytes received since the last piece of body (or, before the body, since the request
        # began) that the parser may be holding: a header or trailer line in the making. An upper
        # bound, except for a read that ends one request and begins the next, not counted (most of
        # it may be the earlier one's body): behind a pipelined request, the limit may be
        # overshot by one read.
        self._unparsed_bytes = 0
        self._began_in_read = False
        self._ended_in_read = False
        self._body_in_read = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._reading_headers = True
        self._arm_header_timer()  # a connection that never sends a request is not kept either

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._began_in_read = self._ended_in_read = self._body_in_read = False
        super().data_received(data)
        if self._refused or self.transport.is_closing():
            return
        if self._body_in_read or (self._began_in_read and self._ended_in_read):
            return
        if self._reading_headers or self._in_request:
            self._unparsed_bytes += len(data)
            if self._unparsed_bytes > self.limits.max_header_bytes:
                self._refuse(HEADER_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers = self._began_in_read = self._in_request = True
        self._unparsed_bytes = 0
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        self._reading_headers = False
        self._unparsed_bytes = 0
        # Headers that arrived in the chunk completing them were not counted yet.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size <= self.limits.max_header_bytes:
            super().on_headers_complete()
            return
        self.refusals.labels(reason=HEADER_TOO_LARGE).inc()
        # The request gets its 431 as any request gets its answer: after those before it on the
        # connection, and closing it (its body is never read).
        app, self.app = self.app, self._too_large_app
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._body_in_read = True
        self._unparsed_bytes = 0

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_request = False
        self._ended_in_read = True
        self._unparsed_bytes = 0

    async def _too_large_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        status, head, body = self._refusal_answer(HEADER_TOO_LARGE)
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": body})

    def _arm_header_timer(self) -> None:
        deadline_s = self.limits.header_deadline_s
        if deadline_s is not None and self._header_timer is None:
            self._header_timer = self.loop.call_later(deadline_s, self._headers_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if not self._in_request:
            self.transport.close()  # nothing asked, nothing to answer (nor counted)
            return
        self._refuse(HEADER_TIMEOUT)

    def _refuse(self, reason: str) -> None:
        """Ends the connection over a request whose headers are not complete: with a plain-text
        answer, or, where an earlier request's answer is still being written, after that answer.
        A request whose trailers grew too large is cut off instead: its route sees the client gone."""
        self._refused = True
        self._disarm_header_timer()
        self.refusals.labels(reason=reason).inc()
        if not self._reading_headers:
            self.transport.close()
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.flow.pause_reading()  # nothing more is read: the connection ends
            self.cycle.keep_alive = False
            return
        status, head, body = self._refusal_answer(reason)
        lines = [STATUS_LINE[status]]
        for name, value in [*self.server_state.default_headers, *head]:
            lines += [name, b": ", value, b"\r\n"]
        self.transport.write(b"".join([*lines, b"\r\n", body]))
        self.transport.close()

    def _refusal_answer(self, reason: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if reason == HEADER_TOO_LARGE:
            status = 431
            text = f"request line and headers over the limit of {self.limits.max_header_bytes} bytes"
        else:
            status = 408
            text = f"the request's headers did not arrive within {self.limits.header_timeout_s:g} s"
        body = text.encode("ascii")
        head = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"connection", b"close"),
        ]
        return status, head, body


def guarded_http_protocol(limits: ClientLimits, refusals: Counter) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to give uvicorn as `http=`."""
    return type(
        "GuardedHttpToolsProtocolWithLimits",
        (GuardedHttpToolsProtocol,),
        {"limits": limits, "refusals": refusals},
    )
