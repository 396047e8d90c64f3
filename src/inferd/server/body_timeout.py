"""A request body that stops arriving is answered with a 408 instead of holding its request forever.

The limit is on the wait for each piece of the body, as nginx's `client_body_timeout`, so a large
upload on a slow link still gets through. Once the body has arrived, reads pass through untouched:
a streaming answer waits on them for the client's disconnect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import ClientDisconnect
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferd.server.errors import ClientDisconnected, RequestTimeoutError
from inferd.server.limits import PathErrorRenderer

# The reason of `inferd_http_client_refusals_total` counted here.
BODY_TIMEOUT = "body_timeout"


@dataclass
class _BodyRead:
    done: bool = False
    timed_out: bool = False
    response_started: bool = False
    # True when the 408 is ours to send: the body stalled before the app began its answer.
    answer_is_ours: bool = False


class BodyReadTimeout:
    def __init__(
        self,
        app: ASGIApp,
        timeout_s: float | None,
        render: PathErrorRenderer,
        count_refusal: Callable[[str], None],
    ) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.render = render
        self.count_refusal = count_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.timeout_s is None:
            await self.app(scope, receive, send)
            return
        timeout_s = self.timeout_s
        read = _BodyRead()

        async def timed_receive() -> Message:
            if read.done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout_s)
            except TimeoutError:
                read.done = read.timed_out = True
                read.answer_is_ours = not read.response_started
                # The app sees the client as gone (its read fails as on a disconnect); the answer
                # is the 408 below.
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                read.done = True
            return message

        async def guarded_send(message: Message) -> None:
            if read.answer_is_ours:
                return
            if message["type"] == "http.response.start":
                read.response_started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except (ClientDisconnect, ClientDisconnected):
            # What the app raised on its failed read (a disconnect, as far as it knows) is not
            # an error of the server's.
            if not read.answer_is_ours:
                raise
        if read.timed_out:
            self.count_refusal(BODY_TIMEOUT)
        if read.answer_is_ours:
            error = RequestTimeoutError(f"the request body stopped arriving for {timeout_s:g} s")
            response = self.render(get_route_path(scope), error)
            response.headers["Connection"] = "close"  # the rest of the body is never read
            await response(scope, receive, send)
