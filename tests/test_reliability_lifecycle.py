"""How the server stops: SIGTERM drains (503 and not ready, in-flight requests finish, exit 0), the
shutdown timeout aborts what is left with an error, and a dead engine makes the server exit 1."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from server_process import ServerProcess, run_server

from inferd.engine.async_llm import AsyncLLM
from inferd.engine.process_engine import EngineProcessDied
from inferd.server.app import create_app
from inferd.server.lifecycle import DrainingServer, serve

LONG = {"prompt": "To be, or not", "max_tokens": 400, "ignore_eos": True, "temperature": 0.0}


def _stream_in_thread(base_url: str, results: list[dict[str, Any]]) -> threading.Thread:
    def run() -> None:
        body = {**LONG, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        chunks = [json.loads(e) for e in events[:-1]]
        results.append(
            {
                "done": events[-1] == "[DONE]",
                "finish_reason": next(c["choices"][0]["finish_reason"] for c in chunks if c["choices"]
                                      and c["choices"][0]["finish_reason"]),
                "completion_tokens": chunks[-1]["usage"]["completion_tokens"],
            }
        )  # fmt: skip

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _poll(check, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_sigterm_lets_in_flight_requests_finish_refuses_new_ones_and_exits_0(tiny_llama: Path) -> None:
    with run_server(tiny_llama, "--kv-cache-memory", "8MiB", "--shutdown-timeout", "60") as server:
        results: list[dict[str, Any]] = []
        threads = [_stream_in_thread(server.base_url, results) for _ in range(3)]
        server.wait_for_metrics(lambda m: m["inferd:num_requests_running"] == 3)
        server.process.send_signal(signal.SIGTERM)
        _poll(lambda: httpx.get(f"{server.base_url}/health").status_code == 503)
        refused = httpx.post(f"{server.base_url}/v1/completions", json=LONG)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "service_unavailable"
        for thread in threads:
            thread.join(timeout=60)
        assert server.process.wait(timeout=60) == 0
    assert results == [{"done": True, "finish_reason": "length", "completion_tokens": 400}] * 3


def test_shutdown_timeout_aborts_what_is_left_with_an_error(tiny_llama: Path) -> None:
    # Well under the 0.3 s the running request's 450 tokens take here, so both are still in flight.
    args = ("--kv-cache-memory", "8MiB", "--max-num-seqs", "1", "--shutdown-timeout", "0.05")
    with run_server(tiny_llama, *args) as server:
        answers: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: answers.append(_post_long(server))) for _ in range(2)]
        for thread in threads:
            thread.start()
        server.wait_for_metrics(lambda m: m["inferd:num_requests_waiting"] == 1)
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=60)
        assert server.process.wait(timeout=60) == 0
        server.wait_for_log("aborting 2 request(s)")
    assert [a.status_code for a in answers] == [503, 503]
    assert all("shutting down" in a.json()["error"]["message"] for a in answers)


def _post_long(server: ServerProcess) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/completions", json={**LONG, "max_tokens": 450}, timeout=60)


async def test_engine_death_answers_500_and_the_server_exits_1(tiny_llama: Path) -> None:
    llm, _, serving, request, kill = await _serving_with_a_long_request(tiny_llama)
    kill.set()
    answer = await request
    assert answer.status_code == 500 and "engine core is gone" in answer.json()["error"]["message"]
    assert await asyncio.wait_for(serving, timeout=30) == 1
    llm.shutdown()


def test_a_dead_engines_reason_is_what_a_stopping_server_answers(tiny_llama: Path) -> None:
    """The server drains once its engine died: /health and new requests say why it died, not
    only that the server is shutting down."""
    from fastapi.testclient import TestClient

    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    app = create_app(llm)
    llm.dead_reason = "engine loop died: the engine core is gone"
    app.state.frontend.draining = True
    client = TestClient(app)  # no lifespan: the engine never starts
    health = client.get("/health")
    refused = client.post("/v1/completions", json=LONG)
    assert health.status_code == 503 and health.json()["error"] == llm.dead_reason
    assert refused.status_code == 503 and refused.json()["error"]["message"] == llm.dead_reason


async def _serving_with_a_long_request(
    tiny_llama: Path,
) -> tuple[AsyncLLM, DrainingServer, asyncio.Future[int], asyncio.Future[httpx.Response], threading.Event]:
    """A server (in this process) whose engine steps until the event returned is set, with one long
    request running."""
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    step = llm.engine.step
    kill = threading.Event()

    def step_until_killed() -> Any:
        if kill.is_set():
            raise EngineProcessDied("the engine core is gone")
        time.sleep(0.01)  # the request outlasts what the test does meanwhile
        return step()

    llm.engine.step = step_until_killed  # type: ignore[method-assign]
    app = create_app(llm)
    # As `inferd serve` configures it: open connections get a bounded time once it stops.
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=1)
    server = DrainingServer(config)
    serving = asyncio.ensure_future(serve(server, app.state.frontend, shutdown_timeout_s=30))
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60)
    assert (await client.get("/health")).status_code == 200
    request = asyncio.ensure_future(client.post("/v1/completions", json=LONG))
    request.add_done_callback(lambda _: asyncio.ensure_future(client.aclose()))
    for _ in range(500):
        if llm.stats().num_running:
            break
        await asyncio.sleep(0.01)
    return llm, server, serving, request, kill


async def test_a_second_signal_during_a_drain_stops_at_once_without_a_traceback(tiny_llama: Path) -> None:
    """The supervisor, cancelled mid-drain, had no result yet: reading it raised InvalidStateError
    (a traceback and exit 1 on a plain Ctrl-C twice). And the requests still running are aborted
    with a 503 at once, instead of being cancelled with a 500 once uvicorn's grace ran out."""
    llm, server, serving, request, _ = await _serving_with_a_long_request(tiny_llama)
    server.handle_exit(signal.SIGTERM, None)
    await asyncio.sleep(0.2)  # draining now: the long request still runs
    assert llm.stats().num_running == 1
    # What a second signal does (uvicorn's handle_exit would also raise the signal again in this
    # process once the server stops, as it does to end a real one).
    server.should_exit = True
    answer = await asyncio.wait_for(request, timeout=5)
    assert answer.status_code == 503 and "shutting down" in answer.json()["error"]["message"]
    assert await asyncio.wait_for(serving, timeout=30) == 0
    llm.shutdown()


async def test_an_engine_that_dies_during_a_drain_still_exits_1(tiny_llama: Path) -> None:
    """A drain ends when no request is left, also when they ended because the engine died: the
    process must still say it failed, or a supervisor takes the death for a clean stop."""
    llm, server, serving, request, kill = await _serving_with_a_long_request(tiny_llama)
    server.handle_exit(signal.SIGTERM, None)
    await asyncio.sleep(0.2)
    kill.set()
    answer = await request
    assert answer.status_code == 500
    assert await asyncio.wait_for(serving, timeout=30) == 1
    llm.shutdown()
