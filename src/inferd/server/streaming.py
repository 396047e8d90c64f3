"""Server-sent events, and cancelling a request when its client goes away.

Once a streamed response has started, Starlette cancels the body iterator when the client
disconnects, and closing the Frontend's iterator aborts the engine requests (freeing their blocks);
before it starts (``started_sse_response`` waits for its first event), and for a whole answer,
``unless_disconnected`` watches for the disconnect.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from contextlib import aclosing
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse

from inferd.server.errors import ClientDisconnected

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: str) -> str:
    return f"data: {payload}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def started_sse_response(request: Request, events: AsyncGenerator[str, None]) -> StreamingResponse:
    """An SSE response whose first event is made before its status line goes out.

    A stream that fails before it has sent anything (a full queue, found only as its engine
    requests are admitted, after the route's own check let it through) raises here, so the client
    gets that error's status (a 429 with Retry-After) rather than an error event inside a 200. A
    client that leaves while it waits stops it (its engine requests aborted), as after."""

    async def first_event() -> str:
        return await anext(events)

    try:
        first = await unless_disconnected(request, first_event())
    except BaseException:
        await events.aclose()
        raise

    async def rest() -> AsyncIterator[str]:
        async with aclosing(events):  # closed with the response: a client gone aborts its requests
            yield first
            async for event in events:
                yield event

    return sse_response(rest())


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read already, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`; if the client disconnects first, cancel it (aborting its engine requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected
    return task.result()
