"""uvicorn's httptools protocol with the header limits of `ClientLimits`: a size, counted while the
headers arrive, and a deadline for them.

uvicorn gives neither: httptools buffers a header of any length, and its keep-alive timer, the only
one it has, is cancelled by the first byte a client sends (a new connection has none at all). Both
refusals are answered before any route exists to shape them, so they are plain text, as uvicorn's
own answer to a malformed request, and the connection closes.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from prometheus_client import Counter
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from inferd.server.client_limits import ClientLimits

# The reasons of `inferd_http_client_refusals_total` that are counted here.
HEADER_TOO_LARGE = "header_too_large"
HEADER_TIMEOUT = "header_timeout"


class _RefusedHeaders(Exception):
    """Raised from a parser callback to stop parsing a request that is refused."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """Set `limits` and `refusals` (the family of `inferd_http_client_refusals_total`) on a
    subclass, as `guarded_http_protocol` does: uvicorn builds one protocol object per connection
    and passes nothing of ours to it."""

    limits: ClassVar[ClientLimits]
    refusals: ClassVar[Counter]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Bytes received while a request's headers are incomplete (an upper bound: a chunk that also
        # ends an earlier request's body counts whole), back to 0 when they complete.
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._refusal: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()  # a connection that never sends a request is not kept either

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_timer is None or self.transport.is_closing():
            return
        self._header_bytes += len(data)
        if self._header_bytes > self.limits.max_header_bytes:
            self._refuse(HEADER_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        self._header_bytes = 0
        # Headers that arrived in the chunk completing them were not counted yet.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            self._refusal = HEADER_TOO_LARGE
            raise _RefusedHeaders  # httptools stops parsing; uvicorn then calls send_400_response
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:
            super().send_400_response(msg)
            return
        self._refuse(self._refusal)

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
        if self.cycle is not None and not self.cycle.response_complete:
            # An earlier request's answer is still being written on this connection: end the
            # connection after it, rather than write a 408 into the middle of it.
            self.cycle.keep_alive = False
            self.refusals.labels(reason=HEADER_TIMEOUT).inc()
            return
        self._refuse(HEADER_TIMEOUT)

    def _refuse(self, reason: str) -> None:
        self._disarm_header_timer()
        if reason == HEADER_TOO_LARGE:
            status = 431
            text = f"request line and headers over the limit of {self.limits.max_header_bytes} bytes"
        else:
            status = 408
            text = f"the request's headers did not arrive within {self.limits.header_timeout_s:g} s"
        self.refusals.labels(reason=reason).inc()
        body = text.encode("ascii")
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def guarded_http_protocol(limits: ClientLimits, refusals: Counter) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to give uvicorn as `http=`."""
    return type(
        "GuardedHttpToolsProtocolWithLimits",
        (GuardedHttpToolsProtocol,),
        {"limits": limits, "refusals": refusals},
    )
