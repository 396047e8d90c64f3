"""Clients that send too much before their request is known, or send it too slowly: headers over
--max-header-bytes get a 431, headers slower than --header-timeout a 408, a body that stops arriving
for --body-timeout a 408 in the API's error format; each closes its connection, is counted in
inferd_http_client_refusals_total, and leaves every other connection served."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from server_process import run_server

from inferd.server.app import add_request_middleware, http_protocol
from inferd.server.client_limits import ClientLimits
from inferd.server.kserve.launch import build_arg_parser as kserve_arg_parser
from inferd.server.serve_cli import server_config

pytestmark = pytest.mark.timeout(60)


@dataclass
class Served:
    port: int
    registry: CollectorRegistry

    def refusals(self, reason: str) -> float:
        value = self.registry.get_sample_value("inferd_http_client_refusals_total", {"reason": reason})
        return value or 0.0

    async def get_ok(self) -> None:
        """Another client is still served."""
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=10) as client:
            assert (await client.get("/ping")).json() == {"pong": True}


@asynccontextmanager
async def serving(limits: ClientLimits) -> AsyncIterator[Served]:
    """A server with every server's request middleware and HTTP protocol (`add_request_middleware`)."""
    registry = CollectorRegistry()
    app = FastAPI()
    add_request_middleware(app, registry, 1_000_000, None, limits)

    @app.post("/v1/completions")
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse(await request.json())

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"pong": True}

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await asyncio.sleep(1.0)
        return {"slow": True}

    config = uvicorn.Config(app, host="127.0.0.1", port=0, http=http_protocol(app), log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        assert not task.done(), task.result()
        await asyncio.sleep(0.01)
    try:
        yield Served(server.servers[0].sockets[0].getsockname()[1], registry)
    finally:
        server.should_exit = True
        await task


async def _read_until_closed(reader: asyncio.StreamReader, timeout_s: float = 10.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout_s)  # read() with no size: to EOF


def _recv_all(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection."""
    received = b""
    while piece := sock.recv(65536):
        received += piece
    return received


def _status_and_body(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


async def test_headers_over_the_limit_arriving_in_pieces_get_a_431_before_they_end() -> None:
    """The parser buffered a header line of any length (a 200 MiB one grew the server by 250 MiB):
    now the bytes are counted as they arrive, and the request is refused before it is whole."""
    async with serving(ClientLimits(max_header_bytes=4096)) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(16):  # 16 KiB of one header's value, never ended
            writer.write(b"a" * 1024)
            await writer.drain()
        status, headers, body = _status_and_body(await _read_until_closed(reader))
        writer.close()
        assert status == 431
        assert headers["connection"] == "close"
        assert b"over the limit of 4096 bytes" in body
        assert served.refusals("header_too_large") == 1
        await served.get_ok()


async def test_headers_over_the_limit_in_one_piece_get_a_431_and_those_under_it_are_served() -> None:
    """Headers that end in the chunk that brings them are measured whole when they end."""
    async with serving(ClientLimits(max_header_bytes=4096)) as served:
        for size, expected in ((3000, 200), (5000, 431)):
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(
                b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
            )
            status, _, _ = _status_and_body(await _read_until_closed(reader))
            writer.close()
            assert status == expected, size
        assert served.refusals("header_too_large") == 1


async def test_headers_that_trickle_in_past_the_header_timeout_get_a_408() -> None:
    """uvicorn's only timer, keep-alive's, is cancelled by a client's first byte: a header line
    every 100 ms held the connection for as long as the client liked."""
    async with serving(ClientLimits(header_timeout_s=0.5)) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        start = time.monotonic()
        writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\n")

        async def trickle() -> None:
            for index in range(50):  # up to 5 s of a header line every 100 ms
                writer.write(f"X-Header-{index}: b\r\n".encode())
                await writer.drain()
                await asyncio.sleep(0.1)

        trickling = asyncio.ensure_future(trickle())
        answer = await _read_until_closed(reader)
        closed_after_s = time.monotonic() - start
        trickling.cancel()
        writer.close()
        assert closed_after_s < 3.0
        status, headers, body = _status_and_body(answer)
        assert status == 408
        assert headers["connection"] == "close"
        assert b"did not arrive within 0.5 s" in body
        assert served.refusals("header_timeout") == 1
        await served.get_ok()


async def test_a_connection_that_never_sends_a_request_is_closed_after_the_header_timeout() -> None:
    """Closed without an answer, as nginx does (a pooled client picking the connection up as it
    closes would read a 408 as the answer to its own request), and not counted as a refusal."""
    async with serving(ClientLimits(header_timeout_s=0.3)) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        assert await _read_until_closed(reader, timeout_s=5.0) == b""
        writer.close()
        assert served.refusals("header_timeout") == 0


async def test_the_size_limit_holds_without_a_header_deadline() -> None:
    """--header-timeout 0 turns off the deadline only (the count once rode on its timer)."""
    async with serving(ClientLimits(max_header_bytes=4096, header_timeout_s=0)) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 16384)
        await writer.drain()
        status, _, _ = _status_and_body(await _read_until_closed(reader))
        writer.close()
        assert status == 431 and served.refusals("header_too_large") == 1


async def test_a_refused_pipelined_request_is_answered_after_the_one_before_it() -> None:
    """The 431 goes out as any answer does, after the earlier request's; it was written in its
    place, or into the middle of a stream."""
    async with serving(ClientLimits(max_header_bytes=4096)) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        oversized = b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n" + oversized)
        answer = await _read_until_closed(reader)
        writer.close()
        first, _, second = answer.partition(b'{"slow":true}')
        assert first.startswith(b"HTTP/1.1 200 ") and second.startswith(b"HTTP/1.1 431 "), answer
        assert served.refusals("header_too_large") == 1


async def test_pipelined_requests_under_a_small_limit_are_not_refused() -> None:
    """A read that ends one request's body and starts the next is not counted as the next one's
    headers (a 100 kB body then a GET got a 431 under a 16 KiB limit)."""
    async with serving(ClientLimits(max_header_bytes=16384)) as served:
        body = json.dumps({"prompt": "z" * 100_000}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        # The next request's headers end in a later read than the one that begins them.
        writer.write(head.encode() + body + b"GET /ping HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"Connection: close\r\n\r\n")
        answer = await _read_until_closed(reader)
        writer.close()
        assert answer.count(b"HTTP/1.1 200 ") == 2 and answer.endswith(b'{"pong":true}'), answer[:300]
        assert served.refusals("header_too_large") == 0


async def test_a_trailer_over_the_limit_cuts_its_request_off() -> None:
    """A chunked body's trailers are header lines the parser buffers too: one that never ends
    was held whole (100 MiB grew the server by 98 MiB), with no limit but the body's timeout."""
    async with serving(ClientLimits(max_header_bytes=4096, body_timeout_s=0)) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head + b"2\r\n{}\r\n0\r\nX-Trailer: ")
        try:
            for _ in range(64):
                writer.write(b"a" * 1024)
                await writer.drain()
        except ConnectionError:
            pass
        await _read_until_closed(reader)  # closed, not waiting for the rest
        writer.close()
        assert served.refusals("header_too_large") == 1
        await served.get_ok()


async def test_the_header_timeout_spares_slow_answers_and_kept_alive_connections() -> None:
    """The deadline ends with the headers: an answer slower than it, and the next request on the
    same connection, are served."""
    async with serving(ClientLimits(header_timeout_s=0.3)) as served:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.port}", timeout=10) as client:
            assert (await client.get("/slow")).json() == {"slow": True}
            assert (await client.get("/slow")).json() == {"slow": True}
            assert (await client.post("/v1/completions", json={"a": 1})).json() == {"a": 1}
        assert served.refusals("header_timeout") == 0


def _body_request(framing: str, body: bytes) -> tuple[bytes, list[bytes]]:
    """The head of a POST /v1/completions and its body's pieces as sent, by Content-Length or chunked."""
    start = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if framing == "content-length":
        head = f"{start}Content-Length: {len(body)}\r\n\r\n"
        return head.encode(), [body[i : i + 8] for i in range(0, len(body), 8)]
    head = f"{start}Transfer-Encoding: chunked\r\n\r\n"
    pieces = [
        f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        for piece in (body[i : i + 8] for i in range(0, len(body), 8))
    ]
    return head.encode(), [*pieces, b"0\r\n\r\n"]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_that_stops_arriving_gets_a_408_in_the_apis_error_format(framing: str) -> None:
    async with serving(ClientLimits(body_timeout_s=0.5)) as served:
        head, pieces = _body_request(framing, json.dumps({"prompt": "x" * 40}).encode())
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(head + pieces[0])  # then nothing more
        await writer.drain()
        start = time.monotonic()
        answer = await _read_until_closed(reader)
        waited_s = time.monotonic() - start
        writer.close()
        status, headers, body = _status_and_body(answer)
        assert status == 408, answer
        assert 0.4 < waited_s < 5.0
        assert headers["connection"] == "close"
        error = json.loads(body)["error"]  # the OpenAI error object, as the route's other errors
        assert "stopped arriving for 0.5 s" in error["message"]
        assert served.refusals("body_timeout") == 1
        assert (
            served.registry.get_sample_value(
                "http_requests_total", {"handler": "/v1/completions", "method": "POST", "status": "4xx"}
            )
            == 1
        )
        await served.get_ok()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_slow_body_that_keeps_arriving_is_read_whole(framing: str) -> None:
    """The limit is on each wait, not on the whole body: pieces 0.25 s apart over 1.5 s get through."""
    async with serving(ClientLimits(body_timeout_s=0.5)) as served:
        sent = {"prompt": "y" * 40}
        head, pieces = _body_request(framing, json.dumps(sent).encode())
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(head)
        for piece in pieces:
            await asyncio.sleep(1.5 / len(pieces))
            writer.write(piece)
            await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"}"), 10)
        writer.close()
        status, _, body = _status_and_body(answer)
        assert status == 200
        assert json.loads(body) == sent
        assert served.refusals("body_timeout") == 0


def test_both_servers_take_the_limits_as_flags() -> None:
    from inferd.cli import build_parser

    flags = ["--max-header-bytes", "2048", "--header-timeout", "7", "--body-timeout", "0"]
    args = build_parser().parse_args(["serve", *flags])
    assert server_config(args).client_limits == ClientLimits(2048, 7.0, 0.0)
    assert server_config(args).client_limits.body_deadline_s is None  # 0: no limit
    kserve_args = kserve_arg_parser().parse_args(["--model-repository", "r", *flags])
    assert (kserve_args.max_header_bytes, kserve_args.header_timeout, kserve_args.body_timeout) == (
        2048,
        7.0,
        0.0,
    )


def test_inferd_serve_gives_uvicorn_the_limits(tiny_llama: Path) -> None:
    """The real server: its connections get the header deadline, and /metrics counts the refusal."""
    with run_server(tiny_llama, "--header-timeout", "0.5", "--body-timeout", "0.5") as server:
        port = int(server.base_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\n")
            answer = _recv_all(slow)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
            stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
            status, _, body = _status_and_body(_recv_all(stalled))
        assert status == 408
        assert "stopped arriving" in json.loads(body)["error"]["message"]
        samples = server.metrics()
        assert samples["inferd_http_client_refusals_total{reason=header_timeout}"] == 1
        assert samples["inferd_http_client_refusals_total{reason=body_timeout}"] == 1
        completion = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert completion.status_code == 200
