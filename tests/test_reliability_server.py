"""A live server under overload, timeouts, caps and bad input: every answer a 4xx in the protocol's
shape (429 with Retry-After, 408, 413, 400/422), never a 5xx, and the engine clean afterwards."""

from __future__ import annotations

import functools
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from server_process import ServerProcess, run_server

MAX_BODY_BYTES = 4096
MAX_TOKENS_CAP = 450
LONG = {"prompt": "To be, or not", "max_tokens": 400, "ignore_eos": True, "temperature": 0.0}


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[ServerProcess]:
    args = (
        "--kv-cache-memory", "8MiB",
        "--max-num-seqs", "1",
        "--max-queued-requests", "2",
        "--max-tokens-cap", str(MAX_TOKENS_CAP),
        "--max-body-bytes", str(MAX_BODY_BYTES),
    )  # fmt: skip
    with run_server(tiny_llama, *args) as process:
        yield process


def _openai_error(response: httpx.Response, status: int) -> dict[str, str | None]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def _tgi_error(response: httpx.Response, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"}
    return body


def _wait_idle(server: ServerProcess) -> None:
    server.wait_for_metrics(
        lambda m: (
            m["inferd:kv_cache_usage_perc"] == 0
            and m["inferd:num_requests_running"] == m["inferd:num_requests_waiting"] == 0
        )
    )


class _Fillers:
    """Long streamed requests that keep the engine busy until `stop()` closes them (aborting them)."""

    def __init__(self, base_url: str) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._base_url = base_url
        self.refused = 0  # fillers that found the queue full themselves (a 429)

    def add(self, count: int) -> None:
        for _ in range(count):
            thread = threading.Thread(target=self._stream, args=(self._base_url,))
            thread.start()
            self._threads.append(thread)

    def _stream(self, base_url: str) -> None:
        body = {**LONG, "max_tokens": MAX_TOKENS_CAP, "stream": True}
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as response:
            if response.status_code == 429:
                self.refused += 1
                return
            for _ in response.iter_lines():
                if self._stop.is_set():
                    return

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


TGI_OVERLOADED = "tgi_request_failure{err=overloaded}"
ABORTED = "inferd:requests_aborted_total"


def _post(url: str, **kwargs: object) -> httpx.Response:
    return httpx.post(url, timeout=60, **kwargs)  # type: ignore[arg-type]


def test_saturated_server_answers_429_at_once_in_each_protocol(server: ServerProcess) -> None:
    url = server.base_url
    before = server.metrics()["inferd:requests_rejected_total"]
    tgi_before = server.metrics().get(TGI_OVERLOADED, 0.0)
    fillers = _Fillers(url)
    try:
        fillers.add(1)
        server.wait_for_metrics(lambda m: m["inferd:num_requests_running"] == 1)

        def fill() -> None:
            """Tops the queue up to its limit: max_num_seqs is 1, so fillers after the running one
            wait, and the tiny model may end a filler within the test's own time."""
            for _ in range(50):
                if server.metrics()["inferd:num_requests_waiting"] == 2:
                    return
                fillers.add(1)
                time.sleep(0.05)
            raise AssertionError("the queue never filled")

        def refused(send: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
            """A probe sent into a full queue, and its latency. A running filler can finish between
            the check and the probe (a loaded machine polls slowly), which lets the probe in: the
            queue is topped up and the probe sent again, a bounded number of times."""
            for _ in range(5):
                fill()
                start = time.perf_counter()
                response = send()
                if response.status_code != 200:
                    return response, time.perf_counter() - start
            raise AssertionError("every probe found room in the queue")

        latencies = []
        with httpx.Client(timeout=60) as client:  # one connection: time the server, not the handshake
            client.get(f"{url}/health")
            for _ in range(5):
                response, elapsed = refused(lambda: client.post(f"{url}/v1/completions", json=LONG))
                error = _openai_error(response, 429)
                assert error["code"] == "rate_limit_exceeded" and "overloaded" in str(error["message"])
                assert int(response.headers["Retry-After"]) >= 1
                latencies.append(elapsed)
        # The refusal is a few integer comparisons: it must not wait behind the queue.
        assert statistics.median(latencies) < 0.05, latencies
        streamed, _ = refused(lambda: _post(f"{url}/v1/chat/completions", json=_chat(stream=True)))
        _openai_error(streamed, 429)  # a status, not an error inside a 200 stream
        for path in ("/generate", "/generate_stream"):
            response, _ = refused(functools.partial(_post, f"{url}{path}", json={"inputs": "To be"}))
            assert _tgi_error(response, 429)["error_type"] == "overloaded"
            assert "Retry-After" in response.headers
        assert httpx.get(f"{url}/health").status_code == 200  # overloaded, not unhealthy
    finally:
        fillers.stop()
    _wait_idle(server)
    after = server.metrics()
    assert after["inferd:requests_rejected_total"] == before + 8 + fillers.refused
    assert after[TGI_OVERLOADED] == tgi_before + 8 + fillers.refused  # TGI's name for the same count


def _chat(**fields: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": "To be, or not"}], "temperature": 0.0, **fields}


def _sse_payloads(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


STREAMS = [
    ("/v1/completions", {"prompt": "To be", "max_tokens": 8, "stream": True}),
    ("/v1/chat/completions", _chat(max_tokens=8, stream=True)),
    ("/generate_stream", {"inputs": "To be", "parameters": {"max_new_tokens": 8}}),
    ("/v1/responses", {"input": "To be", "max_output_tokens": 8, "stream": True}),
]


def _app_letting_a_burst_through(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> FastAPI:
    """An app on a queue of two whose routes' own check lets every request through (it is a no-op),
    as requests of a burst all pass it before any is admitted."""
    from inferd.engine.admission import QueueLimits
    from inferd.engine.async_llm import AsyncLLM
    from inferd.server.app import create_app
    from inferd.server.config import ServerConfig
    from inferd.server.frontend import Frontend

    monkeypatch.setattr(Frontend, "check_ready", lambda self, prompts, n=1, field="n": None)
    llm = AsyncLLM.from_options(
        tiny_llama, engine_process=False, kv_cache_memory="8MiB", max_num_seqs=1,
        queue_limits=QueueLimits(max_requests=2),
    )  # fmt: skip
    return create_app(llm, ServerConfig())


@pytest.mark.parametrize(("path", "body"), STREAMS)
async def test_streams_the_queue_turns_away_as_they_are_admitted_get_429s(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, path: str, body: dict[str, object]
) -> None:
    """Streams that all passed the route's check before any was admitted (a burst: here every one,
    the check made a no-op) learn of a full queue only as their engine requests are admitted. Their
    status line waits for that: the ones turned away are 429s with Retry-After, never a 200 whose
    stream carries the error."""
    import asyncio

    app = _app_letting_a_burst_through(tiny_llama, monkeypatch)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as client:
            answers = await asyncio.gather(*(client.post(path, json=body) for _ in range(6)))
    statuses = sorted(answer.status_code for answer in answers)
    # Two are queued at once (the engine may start one before the last are admitted).
    assert set(statuses) == {200, 429} and statuses.count(429) >= 3, statuses
    for answer in answers:
        if answer.status_code == 429:
            assert int(answer.headers["Retry-After"]) >= 1
        else:
            last = answer.text.rstrip().splitlines()[-1]
            assert '{"error"' not in answer.text and "event: error" not in answer.text
            assert last == "data: [DONE]" or '"generated_text"' in last or '"response.incomplete"' in last


async def test_a_request_of_several_samples_turned_away_is_rejected_once(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n=2 requests of a burst that all passed the route's check: each of a refused request's
    samples may find the queue full as it is admitted, but the client got one 429, and the
    rejected count counts it once."""
    import asyncio

    app = _app_letting_a_burst_through(tiny_llama, monkeypatch)
    body = {"prompt": "To be", "max_tokens": 4, "n": 2, "temperature": 1.0, "seed": 1}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as client:
            answers = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(6)))
            metrics = (await client.get("/metrics")).text
    refused = sum(answer.status_code == 429 for answer in answers)
    rejected = next(
        line for line in metrics.splitlines() if line.startswith("inferd:requests_rejected_total")
    )
    assert refused >= 2 and float(rejected.split()[-1]) == refused, (refused, rejected)


def test_a_queued_stream_whose_client_leaves_before_its_first_event_is_aborted(server: ServerProcess) -> None:
    """Its status line waits for its first event: a client gone meanwhile still aborts it (and frees
    its place in the queue) without waiting for its turn."""
    _wait_idle(server)
    fillers = _Fillers(server.base_url)
    try:
        fillers.add(1)
        server.wait_for_metrics(lambda m: m["inferd:num_requests_running"] == 1)
        before = server.metrics()[ABORTED]
        body = {"prompt": "To be", "max_tokens": 5, "stream": True}
        # Queued behind the filler: no first event yet. The filler's 450 tokens take a few tenths
        # of a second here (a CI run's queued request had its first token 0.36 s after it came),
        # so the client leaves well before.
        with pytest.raises(httpx.ReadTimeout):
            with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body,
                              timeout=httpx.Timeout(10, read=0.1)) as response:  # fmt: skip
                response.read()
        after = server.wait_for_metrics(
            lambda m: m[ABORTED] == before + 1 and m["inferd:num_requests_waiting"] == 0
        )
        assert after["inferd:num_requests_running"] == 1  # the filler still runs: nobody else ended it
    finally:
        fillers.stop()
    _wait_idle(server)


def test_more_generations_than_the_queue_holds_is_a_400_not_a_429(server: ServerProcess) -> None:
    # The queue holds 2: three choices could never be queued together, so a retry cannot help.
    for body in ({**LONG, "max_tokens": 2, "n": 3}, {**LONG, "max_tokens": 2, "prompt": ["a", "b", "c"]}):
        error = _openai_error(httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=30), 400)
        assert error["param"] == "n" and "3 generations" in str(error["message"])
    two = httpx.post(f"{server.base_url}/v1/completions", json={**LONG, "max_tokens": 2, "n": 2}, timeout=30)
    assert two.status_code == 200 and len(two.json()["choices"]) == 2


def test_timeouts_in_each_protocol_abort_the_request_and_count(server: ServerProcess) -> None:
    url = server.base_url
    before = server.metrics()["inferd:requests_timed_out_total"]
    error = _openai_error(
        httpx.post(f"{url}/v1/completions", json={**LONG, "timeout": 0.05}, timeout=30), 408
    )
    assert error["code"] == "request_timeout"

    headers = {"X-Request-Timeout": "0.05"}
    body = _chat(max_tokens=400, ignore_eos=True, stream=True)
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30
    ) as response:
        assert response.status_code == 200
        payloads = _sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["choices"][0]["finish_reason"] == "timeout"

    tgi = {"inputs": "To be", "parameters": {"max_new_tokens": 400}}
    assert (
        _tgi_error(httpx.post(f"{url}/generate", json=tgi, headers=headers, timeout=30), 408)["error_type"]
        == "timeout"
    )
    with httpx.stream("POST", f"{url}/generate_stream", json=tgi, headers=headers, timeout=30) as response:
        last = json.loads(_sse_payloads(response)[-1])
    assert last["error_type"] == "timeout"

    bad = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, headers={"X-Request-Timeout": "soon"})
    assert _openai_error(bad, 400)["param"] == "X-Request-Timeout"
    _wait_idle(server)
    assert server.metrics()["inferd:requests_timed_out_total"] == before + 4


def test_max_tokens_cap_refuses_more_and_bounds_the_default(server: ServerProcess) -> None:
    url = server.base_url
    over = httpx.post(f"{url}/v1/completions", json={**LONG, "max_tokens": MAX_TOKENS_CAP + 1})
    assert _openai_error(over, 400)["param"] == "max_tokens"
    tgi = {"inputs": "To be", "parameters": {"max_new_tokens": MAX_TOKENS_CAP + 1}}
    assert "max_new_tokens" in _tgi_error(httpx.post(f"{url}/generate", json=tgi), 422)["error"]
    newer = _chat(max_completion_tokens=MAX_TOKENS_CAP + 1)
    assert _openai_error(httpx.post(f"{url}/v1/chat/completions", json=newer), 400)["param"] == (
        "max_completion_tokens"
    )
    # No max_tokens: the rest of the context (about 500 tokens here), capped by the server.
    answer = httpx.post(f"{url}/v1/chat/completions", json=_chat(ignore_eos=True), timeout=60).json()
    assert answer["usage"]["completion_tokens"] == MAX_TOKENS_CAP
    assert answer["choices"][0]["finish_reason"] == "length"


def test_oversized_bodies_are_413_in_the_protocol_shape(server: ServerProcess) -> None:
    url = server.base_url
    big = {"prompt": "x" * MAX_BODY_BYTES}
    assert _openai_error(httpx.post(f"{url}/v1/completions", json=big), 413)["code"] == "request_too_large"
    _tgi_error(httpx.post(f"{url}/generate", json={"inputs": "x" * MAX_BODY_BYTES}), 413)

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 64 + 1):
            yield b"x" * 64
        yield b'"}'

    response = httpx.post(
        f"{url}/v1/completions", content=chunked(), headers={"Content-Type": "application/json"}
    )
    _openai_error(response, 413)


# (path, raw body): each must be refused with a 4xx in the protocol's shape.
BAD_OPENAI_BODIES = [
    ("/v1/completions", b'{"prompt": "x", "max_tokens": '),  # truncated JSON
    ("/v1/completions", b'{"prompt": "\xff\xfe"}'),  # invalid UTF-8
    ("/v1/completions", b'{"prompt": "\\ud800 lone surrogate"}'),
    ("/v1/completions", b'["not", "an", "object"]'),
    ("/v1/completions", b'{"prompt": 5}'),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": "many"}'),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -1}'),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1000000000000}'),
    ("/v1/completions", b'{"prompt": "x", "temperature": 7}'),
    ("/v1/completions", b'{"prompt": "x", "timeout": -3}'),
    ("/v1/completions", b'{"prompt": ""}'),
    ("/v1/completions", b'{"prompt": []}'),
    ("/v1/completions", b'{"prompt": [[]]}'),
    ("/v1/completions", b'{"prompt": [1, 2, 99999999]}'),
    ("/v1/completions", b'{"prompt": [-1]}'),
    ("/v1/completions", b'{"prompt": "x", "stop_token_ids": [99999999]}'),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"abc": 1}}'),
    ("/v1/completions", b'{"prompt": "x", "n": 0}'),
    ("/v1/chat/completions", b'{"messages": []}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}'),
    ("/v1/chat/completions", b'{"messages": "hello"}'),
    ("/tokenize", b'{"prompt": "\\ud800"}'),
    ("/detokenize", b'{"tokens": [99999999]}'),
]
BAD_TGI_BODIES = [
    ("/generate", b"{"),
    ("/generate", b'{"inputs": "\xc3\x28"}'),
    ("/generate", b'{"inputs": "\\ud800"}'),
    ("/generate", b'{"inputs": ""}'),
    ("/generate", b'{"inputs": "x", "parameters": {"max_new_tokens": 0}}'),
    ("/generate", b'{"inputs": "x", "parameters": {"max_new_tokens": 99999999999}}'),
    ("/generate", b'{"inputs": "x", "parameters": {"top_p": 2}}'),
    ("/generate", b'{"inputs": ["x"]}'),
    ("/generate_stream", b'{"inputs": "x", "parameters": "fast"}'),
    ("/", b'{"inputs": 3}'),
]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"prompt": "\\ud800"}', "prompt"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
        (b'{"inputs": "\\ud800"}', "inputs"),
    ],
)
def test_a_text_tokenize_refuses_names_its_field(server: ServerProcess, body: bytes, field: str) -> None:
    """The 400 named no field (param null) for a text the tokenizer refuses."""
    response = httpx.post(
        f"{server.base_url}/tokenize", content=body, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text


@pytest.mark.parametrize(("path", "body"), BAD_OPENAI_BODIES)
def test_bad_openai_input_is_a_4xx_in_openai_shape(server: ServerProcess, path: str, body: bytes) -> None:
    response = httpx.post(
        f"{server.base_url}{path}", content=body, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert 400 <= response.status_code < 500, response.text
    _openai_error(response, response.status_code)


@pytest.mark.parametrize(("path", "body"), BAD_TGI_BODIES)
def test_bad_tgi_input_is_a_4xx_in_tgi_shape(server: ServerProcess, path: str, body: bytes) -> None:
    response = httpx.post(
        f"{server.base_url}{path}", content=body, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert 400 <= response.status_code < 500, response.text
    _tgi_error(response, response.status_code)


def test_after_all_the_abuse_the_engine_is_clean_and_healthy(server: ServerProcess) -> None:
    _wait_idle(server)
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    answer = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "To be", "max_tokens": 3})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
