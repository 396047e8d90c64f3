"""A scripted OpenAI-compatible server for bench tests: known first-token and inter-token delays.

Every request streams `max_tokens` chunks of one token each. Chunk i is sent at
`arrival + first_token_s + i * inter_token_s`, scheduled against absolute deadlines so sleep
overshoot does not accumulate. A prompt containing `status=NNN` is answered with that HTTP status.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn

STUB_MODEL = "stub-model"

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]


@dataclass
class StubScript:
    first_token_s: float
    inter_token_s: float
    report_usage: bool = True
    # What each token chunk carries; "" mimics a server that streams only special (hidden) tokens.
    token_text: str = " tok"
    # Faults: a stream that closes without `data: [DONE]`, a chunk that is JSON of the wrong shape
    # sent in place of every token chunk, and a body declared gzip that is not.
    send_done: bool = True
    odd_chunk: str | None = None
    false_gzip: bool = False
    # The last token chunk's finish_reason ("timeout": a server that cut the answer itself).
    finish_reason: str | None = None
    received: list[dict[str, Any]] = field(default_factory=list)


def _prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        return " ".join(str(message.get("content", "")) for message in body["messages"])
    return str(body.get("prompt", ""))


def _prompt_tokens(body: dict[str, Any]) -> int:
    prompt = body.get("prompt")
    return len(prompt) if isinstance(prompt, list) else len(_prompt_text(body).split())


def _chunk(chat: bool, text: str) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
    return {
        "object": "chat.completion.chunk" if chat else "text_completion",
        "model": STUB_MODEL,
        "choices": [choice],
    }


async def _events(script: StubScript, body: dict[str, Any], chat: bool, arrived: float) -> AsyncIterator[str]:
    max_tokens = int(body["max_tokens"])
    for index in range(max_tokens):
        deadline = arrived + script.first_token_s + index * script.inter_token_s
        await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
        chunk = _chunk(chat, script.token_text)
        if index == max_tokens - 1:
            chunk["choices"][0]["finish_reason"] = script.finish_reason
        payload = script.odd_chunk if script.odd_chunk is not None else json.dumps(chunk)
        yield f"data: {payload}\n\n"
    if script.report_usage and (body.get("stream_options") or {}).get("include_usage"):
        prompt_tokens = _prompt_tokens(body)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens}
        usage["total_tokens"] = prompt_tokens + max_tokens
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
    if script.send_done:
        yield "data: [DONE]\n\n"


def build_stub_app(script: StubScript) -> ASGIApp:
    """A bare ASGI app (no framework), so the stub's own overhead stays well under the delays it adds."""

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        arrived = time.perf_counter()
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] == "GET" and path == "/v1/models":
            await _send_json(send, 200, {"object": "list", "data": [{"id": STUB_MODEL, "object": "model"}]})
            return
        if scope["method"] != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            await _send_json(send, 404, {"error": {"message": f"no route {path}"}})
            return
        body = json.loads(await _read_body(receive))
        script.received.append(body)
        status = re.search(r"status=(\d{3})", _prompt_text(body))
        if status:
            await _send_json(send, int(status.group(1)), {"error": {"message": "scripted failure"}})
            return
        headers = [(b"content-type", b"text/event-stream")]
        if script.false_gzip:
            headers.append((b"content-encoding", b"gzip"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async for event in _events(script, body, path.endswith("/chat/completions"), arrived):
            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


@contextmanager
def running_stub(script: StubScript) -> Iterator[str]:
    """Serve the stub on a free 127.0.0.1 port in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_stub_app(script), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            time.sleep(0.01)
        else:
            raise RuntimeError("stub server did not start within 5 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
