"""The bench client and runner against a stub server whose delays are known: the numbers must match them."""

from __future__ import annotations

import socket

import pytest
from bench_stub_server import STUB_MODEL, StubScript, running_stub

from inferd.bench.client import OpenAIStreamClient, first_served_model
from inferd.bench.datasets import BenchRequest
from inferd.bench.plot import in_flight_over_time
from inferd.bench.report import summarize
from inferd.bench.runner import RunResult, arrival_offsets, run_requests

FIRST_TOKEN_S = 1.0
INTER_TOKEN_S = 0.1
OUTPUT_TOKENS = 12
TOLERANCE = 0.05
CONCURRENT = 4


async def _bench(
    base_url: str,
    requests: list[BenchRequest],
    endpoint: str = "completions",
    warm_script: StubScript | None = None,
    **run_options: object,
) -> RunResult:
    """Run `requests` through a fresh client. With `warm_script`, first open as many connections as
    there are requests (with the stub's delays at zero), so connection set-up and the app's first-call
    costs stay out of the timed run, as they would in a long benchmark."""
    client = OpenAIStreamClient(base_url, STUB_MODEL, endpoint, ignore_eos=True)  # type: ignore[arg-type]
    try:
        if warm_script is not None:
            delays = warm_script.first_token_s, warm_script.inter_token_s
            warm_script.first_token_s = warm_script.inter_token_s = 0.0
            await run_requests(client.send, requests, show_progress=False)
            warm_script.first_token_s, warm_script.inter_token_s = delays
            warm_script.received.clear()
        return await run_requests(client.send, requests, show_progress=False, **run_options)  # type: ignore[arg-type]
    finally:
        await client.aclose()


def _requests(count: int, prompt: str | list[int] = "hello there world") -> list[BenchRequest]:
    return [BenchRequest(prompt=prompt, max_tokens=OUTPUT_TOKENS, input_len=None) for _ in range(count)]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
async def test_ttft_tpot_and_throughput_match_the_stub_delays(endpoint: str) -> None:
    script = StubScript(first_token_s=FIRST_TOKEN_S, inter_token_s=INTER_TOKEN_S)
    with running_stub(script) as base_url:
        result = await _bench(base_url, _requests(CONCURRENT), endpoint, warm_script=script)
    summary = summarize(result.records, result.duration_s)

    assert summary["completed"] == CONCURRENT and summary["failed"] == 0
    assert summary["tokens_from_usage"] == CONCURRENT
    assert summary["total_output_tokens"] == CONCURRENT * OUTPUT_TOKENS
    assert summary["total_input_tokens"] == CONCURRENT * 3
    # Medians for the per-request latencies: one request the shared CPUs delayed must not decide the test.
    assert summary["ttft_ms"]["p50"] == pytest.approx(FIRST_TOKEN_S * 1000, rel=TOLERANCE)
    assert summary["tpot_ms"]["mean"] == pytest.approx(INTER_TOKEN_S * 1000, rel=TOLERANCE)
    assert summary["itl_ms"]["p50"] == pytest.approx(INTER_TOKEN_S * 1000, rel=TOLERANCE)
    request_latency_s = FIRST_TOKEN_S + (OUTPUT_TOKENS - 1) * INTER_TOKEN_S
    assert summary["e2e_ms"]["p50"] == pytest.approx(request_latency_s * 1000, rel=TOLERANCE)
    # All are sent at once, so the run lasts one request's latency.
    assert summary["request_throughput"] == pytest.approx(CONCURRENT / request_latency_s, rel=TOLERANCE)
    expected_output_throughput = CONCURRENT * OUTPUT_TOKENS / request_latency_s
    assert summary["output_throughput"] == pytest.approx(expected_output_throughput, rel=TOLERANCE)
    body = script.received[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["model"] == STUB_MODEL
    assert ("messages" in body) == (endpoint == "chat")


async def test_max_concurrency_caps_requests_in_flight() -> None:
    with running_stub(StubScript(first_token_s=0.02, inter_token_s=0.01)) as base_url:
        result = await _bench(base_url, _requests(6), max_concurrency=2)
    assert all(record.ok for record in result.records)
    _, in_flight = in_flight_over_time(result.records)
    assert max(in_flight) == 2


async def test_poisson_arrivals_delay_the_sends() -> None:
    with running_stub(StubScript(first_token_s=0.01, inter_token_s=0.01)) as base_url:
        result = await _bench(base_url, _requests(4), request_rate=10.0, seed=3)
    offsets = arrival_offsets(4, 10.0, 3)
    for record, offset in zip(result.records, offsets, strict=True):
        assert record.start_s >= offset
    # The first request goes at once: the duration (first send to last byte) has no idle lead-in.
    assert offsets[0] == 0.0 and offsets == sorted(set(offsets))


async def test_errors_are_counted_by_kind() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    with running_stub(StubScript(first_token_s=0.01, inter_token_s=0.01)) as base_url:
        mixed = await _bench(base_url, _requests(2) + _requests(3, prompt="please status=429"))
    unreachable = await _bench(dead_url, _requests(1))
    summary = summarize(mixed.records + unreachable.records, mixed.duration_s)
    assert summary["completed"] == 2
    assert summary["errors"] == {"http_429": 3, "connection": 1}
    assert "scripted failure" in (mixed.records[2].error_detail or "")


async def test_a_stream_without_text_is_an_empty_error() -> None:
    with running_stub(StubScript(first_token_s=0.01, inter_token_s=0.01, token_text="")) as base_url:
        result = await _bench(base_url, _requests(1))
    record = result.records[0]
    assert record.error == "empty" and record.output_tokens == OUTPUT_TOKENS
    assert f"{OUTPUT_TOKENS} tokens" in (record.error_detail or "")


@pytest.mark.parametrize(("reason", "error"), [("timeout", "server_timeout"), ("abort", "server_abort"),
                                               ("length", None)])  # fmt: skip
async def test_an_answer_the_server_cut_short_is_a_failure(reason: str, error: str | None) -> None:
    """inferd ends a stream its own timeout stopped with finish_reason "timeout", vLLM one it aborted
    with "abort": counted as completed, such answers would make an overloaded server look faster."""
    with running_stub(StubScript(first_token_s=0.01, inter_token_s=0.01, finish_reason=reason)) as base_url:
        result = await _bench(base_url, _requests(1))
    record = result.records[0]
    assert record.error == error
    if error is not None:
        assert f"finish_reason {reason!r}" in (record.error_detail or "")


async def test_missing_usage_falls_back_to_chunks_and_is_flagged() -> None:
    with running_stub(StubScript(first_token_s=0.01, inter_token_s=0.01, report_usage=False)) as base_url:
        result = await _bench(base_url, _requests(1, prompt=[1, 2, 3, 4]))
    record = result.records[0]
    assert record.ok and not record.tokens_from_usage
    assert record.output_tokens == OUTPUT_TOKENS
    assert record.prompt_tokens is None


def test_first_served_model_reads_v1_models() -> None:
    with running_stub(StubScript(first_token_s=0.01, inter_token_s=0.01)) as base_url:
        assert first_served_model(base_url + "/v1") == STUB_MODEL
        with pytest.raises(ValueError, match="cannot list the models at .*404 Not Found"):
            first_served_model(base_url + "/elsewhere")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    with pytest.raises(ValueError, match="cannot list the models at .*; is the server up"):
        first_served_model(dead_url)


async def test_the_timeout_bounds_the_whole_request_not_each_read() -> None:
    """Tokens every 0.1 s keep every read short; the 12-token answer takes 1.2 s, past the 0.5 s."""
    with running_stub(StubScript(first_token_s=0.0, inter_token_s=0.1)) as base_url:
        client = OpenAIStreamClient(base_url, STUB_MODEL, timeout_s=0.5)
        try:
            result = await run_requests(client.send, _requests(1), show_progress=False)
        finally:
            await client.aclose()
    assert result.records[0].error == "timeout" and "0.5 s" in (result.records[0].error_detail or "")
    assert result.duration_s < 1.0


@pytest.mark.parametrize(
    ("fault", "detail"),
    [
        ({"send_done": False}, "ended without data: [DONE]"),
        ({"odd_chunk": '{"choices": ["not an object"]}'}, "unreadable chunk"),
        ({"odd_chunk": "[" * 100_000 + "]" * 100_000}, "not JSON"),
        ({"false_gzip": True}, "decompress"),
    ],
)
async def test_a_broken_stream_is_a_stream_error_not_a_crash(fault: dict[str, object], detail: str) -> None:
    """Each request's failure is a record of its own; the others and the run go on."""
    with running_stub(StubScript(first_token_s=0.01, inter_token_s=0.01, **fault)) as base_url:  # type: ignore[arg-type]
        result = await _bench(base_url, _requests(2))
    assert [record.error for record in result.records] == ["stream", "stream"]
    assert detail in (result.records[0].error_detail or "")


def test_a_chat_deltas_reasoning_and_tool_calls_are_generated_text() -> None:
    """A thinking model's first token is a thought: timed as its first token, not an empty answer."""
    from inferd.bench.client import chunk_text

    def chat(**delta: object) -> dict[str, object]:
        return {"choices": [{"index": 0, "delta": delta}]}

    assert chunk_text(chat(reasoning_content="Let me"), "chat") == "Let me"
    assert chunk_text(chat(reasoning="think"), "chat") == "think"
    assert chunk_text(chat(content="Hi", reasoning_content=None), "chat") == "Hi"
    call = {"index": 0, "function": {"name": "get_weather", "arguments": '{"city"'}}
    assert chunk_text(chat(tool_calls=[call]), "chat") == 'get_weather{"city"'
    assert chunk_text(chat(role="assistant"), "chat") == ""
    assert chunk_text({"choices": [{"index": 0, "text": "abc"}]}, "completions") == "abc"


def test_burstiness_shapes_the_gaps_and_keeps_their_mean() -> None:
    """Gamma gaps of shape k: mean 1/rate, coefficient of variation 1/sqrt(k); k = 1 is the Poisson
    process the bench drew before (the same seed, the same offsets)."""
    import random
    import statistics

    def gaps(burstiness: float) -> list[float]:
        offsets = arrival_offsets(20001, 10.0, 5, burstiness)
        return [later - earlier for earlier, later in zip(offsets, offsets[1:], strict=False)]

    for burstiness in (0.25, 4.0):
        drawn = gaps(burstiness)
        assert statistics.fmean(drawn) == pytest.approx(0.1, rel=0.05)
        variation = statistics.pstdev(drawn) / statistics.fmean(drawn)
        assert variation == pytest.approx(burstiness**-0.5, rel=0.1)
    rng = random.Random(5)
    assert gaps(1.0)[:50] == pytest.approx([rng.expovariate(10.0) for _ in range(50)])
    for bad in (0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="burstiness"):
            arrival_offsets(3, 1.0, 0, burstiness=bad)
