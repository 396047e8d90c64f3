"""Prometheus metrics of a real `inferd serve`, and client disconnects freeing KV blocks."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from server_process import ServerProcess, run_server

from inferd.engine.core import EngineStats
from inferd.engine.outputs import RequestMetrics, RequestOutput
from inferd.server.frontend import _RequestTracker
from inferd.server.metrics import FinishedRequest, ServerMetrics

RUNNING = "inferd:num_requests_running"
WAITING = "inferd:num_requests_waiting"
KV_USAGE = "inferd:kv_cache_usage_perc"
ABORTED = "inferd:requests_aborted_total"
GENERATED = "inferd:generation_tokens_total"


# The CPU's default, and a GPU's (the core in its own process, steps launched before the last
# one's tokens are read) forced on the CPU.
ENGINE_MODES = {"thread": (), "process-async": ("--engine-process", "--async-scheduling")}


@pytest.fixture(scope="module", params=list(ENGINE_MODES))
def server(tiny_llama, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    args = ("--kv-cache-memory", "8MiB", "--served-model-name", "tiny", *ENGINE_MODES[request.param])
    with run_server(tiny_llama, *args) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def _idle(samples: dict[str, float]) -> bool:
    return samples[RUNNING] == 0 and samples[WAITING] == 0 and samples[KV_USAGE] == 0


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_counters_move_by_the_known_amounts(server: ServerProcess, client: openai.OpenAI) -> None:
    before = server.metrics()
    prompt_tokens = 0
    for max_tokens in (3, 5):
        result = client.completions.create(
            model="tiny", prompt="To be, or not", max_tokens=max_tokens, extra_body={"ignore_eos": True}
        )
        assert result.usage is not None
        prompt_tokens += result.usage.prompt_tokens
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        n=2,
        extra_body={"ignore_eos": True},
    )
    assert chat.usage is not None
    prompt_tokens += 2 * chat.usage.prompt_tokens  # n=2 is two engine requests with the same prompt
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="To",
            max_tokens=2,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].usage is not None
    prompt_tokens += chunks[-1].usage.prompt_tokens

    after = server.wait_for_metrics(_idle)
    assert _delta(after, before, GENERATED) == 3 + 5 + 4 + 4 + 2
    assert _delta(after, before, "inferd:prompt_tokens_total") == prompt_tokens
    assert _delta(after, before, "inferd:requests_finished_total{finish_reason=length}") == 5
    for histogram in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
    ):
        assert _delta(after, before, f"inferd:{histogram}_count") == 5
    # The phases add up: queue + prefill is the time to first token, and + decode the whole request.
    phases = ("queue_time", "prefill_time", "decode_time")
    queue, prefill, decode = (_delta(after, before, f"inferd:request_{name}_seconds_sum") for name in phases)
    ttft = _delta(after, before, "inferd:time_to_first_token_seconds_sum")
    e2e = _delta(after, before, "inferd:e2e_request_latency_seconds_sum")
    assert queue + prefill == pytest.approx(ttft) and queue + prefill + decode == pytest.approx(e2e)
    inference = _delta(after, before, "inferd:request_inference_time_seconds_sum")
    assert _delta(after, before, "inferd:request_inference_time_seconds_count") == 5
    assert inference == pytest.approx(prefill + decode)
    # What was asked: max_tokens 3, 5, 4 (twice, n=2) and 2; n 1, 1, 2 (once, for the prompt), 1.
    assert _delta(after, before, "inferd:request_params_max_tokens_sum") == 3 + 5 + 4 + 4 + 2
    assert _delta(after, before, "inferd:request_params_max_tokens_count") == 5
    assert _delta(after, before, "inferd:request_params_n_sum") == 1 + 1 + 2 + 1
    assert _delta(after, before, "inferd:request_params_n_count") == 4
    assert _delta(after, before, "inferd:request_generation_tokens_sum") == 18
    # Inter-token gaps: one per token after the first of each request.
    assert _delta(after, before, "inferd:inter_token_latency_seconds_count") == 18 - 5
    assert _delta(after, before, "inferd:prefix_cache_queries_total") == prompt_tokens
    assert _delta(after, before, ABORTED) == 0
    # TGI's names count the same engine requests, whichever API they came by.
    assert _delta(after, before, "tgi_request_count") == _delta(after, before, "tgi_request_success") == 5
    assert _delta(after, before, "tgi_request_generated_tokens_sum") == 18
    assert _delta(after, before, "tgi_request_duration_sum") == pytest.approx(e2e)
    # Tokens per step: every prompt token the cache did not hold, and each request's tokens after
    # its first fed back in, in steps of 1 to 16 tokens (decode steps of one or two sequences, the
    # short prompts).
    hits = _delta(after, before, "inferd:prefix_cache_hits_total")
    assert _delta(after, before, "inferd:iteration_tokens_total_sum") == prompt_tokens - hits + 18 - 5
    steps = _delta(after, before, "inferd:iteration_tokens_total_count")
    assert steps == _delta(after, before, "inferd:iteration_tokens_total_bucket{le=+Inf}") >= 13
    small = _delta(after, before, "inferd:iteration_tokens_total_bucket{le=1.0}")
    assert 0 < small < steps == _delta(after, before, "inferd:iteration_tokens_total_bucket{le=16.0}")


def test_stream_disconnect_frees_blocks(server: ServerProcess) -> None:
    before = server.metrics()
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(6), strict=False) if line.startswith("data:")]
        assert received
        assert server.metrics()[KV_USAGE] > 0
    after = server.wait_for_metrics(lambda s: _idle(s) and _delta(s, before, ABORTED) == 1)
    assert _delta(after, before, "inferd:requests_finished_total{finish_reason=abort}") == 1
    assert _delta(after, before, GENERATED) < 500


def test_non_streaming_disconnect_aborts_too(server: ServerProcess) -> None:
    before = server.metrics()
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 500, "ignore_eos": True}
    # The client leaves after 0.05 s, where the 500 tokens take 0.25 s or more here (0.3 s was not
    # always short enough with the engine process and asynchronous scheduling).
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.05))
    after = server.wait_for_metrics(lambda s: _idle(s) and _delta(s, before, ABORTED) == 1)
    assert _delta(after, before, GENERATED) < 500


def test_metrics_are_labelled_and_prefixed(server: ServerProcess) -> None:
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in (
        RUNNING,
        WAITING,
        KV_USAGE,
        "inferd:num_preemptions_total",
        "inferd:prefix_cache_hits_total",
    ):
        assert f'{name}{{model_name="tiny"}}' in text
    assert "inferd:gpu_memory_used_bytes" not in text  # served on the CPU
    assert "inferd:spec_decode_draft_kv_cache_usage_perc" not in text  # without a draft model
    # The engine's settings, its KV blocks as sized at start-up (from its process too).
    info = next(line for line in text.splitlines() if line.startswith("inferd:engine_config_info{"))
    assert 'dtype="float32"' in info and 'quantization="none"' in info and 'kv_cache_dtype="float32"' in info
    assert 'block_size="16"' in info and 'num_kv_blocks="unknown"' not in info and info.endswith(" 1.0")


def test_a_beam_search_records_what_it_asked_once(server: ServerProcess) -> None:
    """Its steps are one-token engine requests; the parameter histograms get the client's
    max_tokens and beam width once per prompt."""
    before = server.metrics()
    body = {"model": "tiny", "prompt": ["To be", "Or not"], "max_tokens": 3, "n": 2, "use_beam_search": True}
    assert httpx.post(f"{server.base_url}/v1/completions", json=body).status_code == 200
    after = server.wait_for_metrics(_idle)
    assert _delta(after, before, "inferd:request_params_max_tokens_count") == 2
    assert _delta(after, before, "inferd:request_params_max_tokens_sum") == 6
    assert _delta(after, before, "inferd:request_params_n_sum") == 4


def _http(route: str, method: str, status: str) -> str:
    return f"http_requests_total{{handler={route}}}{{method={method}}}{{status={status}}}"


def test_http_requests_are_counted_by_route_template_and_status_class(server: ServerProcess) -> None:
    """vLLM's HTTP metrics (prometheus-fastapi-instrumentator's names): a matched route by its
    template, an unmatched path as `none`, the status by class; the duration histogram beside
    them; and the process's own metrics."""
    before = server.metrics()
    httpx.get(f"{server.base_url}/v1/models")
    httpx.get(f"{server.base_url}/v1/models/tiny")
    httpx.post(f"{server.base_url}/v1/completions", json={"model": "tiny"})  # no prompt: a 400
    httpx.get(f"{server.base_url}/no/such/route")
    after = server.metrics()
    assert _delta(after, before, _http("/v1/models", "GET", "2xx")) == 1
    assert _delta(after, before, _http("/v1/models/{model_id:path}", "GET", "2xx")) == 1
    assert _delta(after, before, _http("/v1/completions", "POST", "4xx")) == 1
    assert _delta(after, before, _http("none", "GET", "4xx")) == 1
    duration = "http_request_duration_seconds_count{handler=/v1/completions}{method=POST}"
    assert _delta(after, before, duration) == 1
    assert after["process_resident_memory_bytes"] > 0 and "python_info" in "".join(after)


def test_no_created_series_beside_the_counters_and_histograms(server: ServerProcess) -> None:
    """prometheus_client's `<name>_created` timestamps (one gauge family per counter and
    histogram) are off, as vLLM turns them off."""
    assert (
        httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "To be", "max_tokens": 2}).status_code
        == 200
    )
    created = [name for name in server.metrics() if "_created" in name]
    assert not created, created[:5]


def test_the_engine_config_info_names_low_bit_settings(tiny_model_factory) -> None:
    from inferd.engine.builder import build_engine_config

    config = build_engine_config(tiny_model_factory("llama"), quantization="fp8", kv_cache_dtype="fp8",
                                 num_kv_blocks=40, block_size=8)  # fmt: skip
    metrics, registry = _metrics_for_unit_test()
    metrics.describe_engine(config)
    labels = {"model_name": "m", "dtype": "float32", "quantization": "fp8", "kv_cache_dtype": "float8_e4m3fn",
              "block_size": "8", "num_kv_blocks": "40"}  # fmt: skip
    assert registry.get_sample_value("inferd:engine_config_info", labels) == 1.0
    # The KV cache's settings under vLLM's family and label names too.
    cache = {"model_name": "m", "block_size": "8", "cache_dtype": "float8_e4m3fn",
             "enable_prefix_caching": "True", "num_gpu_blocks": "40",
             "gpu_memory_utilization": "None"}  # fmt: skip
    assert registry.get_sample_value("inferd:cache_config_info", cache) == 1.0


def _metrics_for_unit_test() -> tuple[ServerMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    # As a GPU engine reports it (the engine core reads its own process's device memory).
    stats = EngineStats(
        num_running=1, num_waiting=2, kv_usage=0.5, num_preemptions=3, prefix_queries=10, prefix_hits=4,
        device_memory_bytes=1234, draft_kv_usage=0.25,
    )  # fmt: skip
    return ServerMetrics(registry, "m", lambda: stats), registry


def test_finish_reasons_feed_their_counters() -> None:
    metrics, registry = _metrics_for_unit_test()
    for reason in ("stop", "timeout", "abort", "timeout"):
        metrics.record_finished(FinishedRequest(reason, 4, 2, 0.1, 0.3, 0.01))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"model_name": "m", **labels})

    assert value("inferd:requests_timed_out_total") == 2
    assert value("inferd:requests_aborted_total") == 1
    assert value("inferd:requests_finished_total", finish_reason="timeout") == 2
    assert value("inferd:prompt_tokens_total") == 16
    # Only the request that ran to its end enters the latency histograms.
    assert value("inferd:e2e_request_latency_seconds_count") == 1
    assert value("inferd:request_time_per_output_token_seconds_sum") == pytest.approx(0.2)
    assert value("inferd:num_requests_waiting") == 2
    assert value("inferd:gpu_memory_used_bytes") == 1234
    assert value("inferd:spec_decode_draft_kv_cache_usage_perc") == 0.25  # a draft model's engine
    assert value("inferd:prefix_cache_hits_total") == 4


def test_inter_token_gaps_count_every_token_after_the_first_however_they_are_grouped() -> None:
    """Outputs may carry several tokens (stop-string hold-back, outputs merged behind a slow
    reader): the histogram still gets one gap per token after the first."""
    metrics, registry = _metrics_for_unit_test()
    tracker = _RequestTracker("r", 3, metrics)
    timing = RequestMetrics(arrival_time=0.0)
    tokens: list[int] = []
    for new in ([1, 2], [3], [4, 5, 6]):
        tokens += new
        tracker.on_output(RequestOutput("r", [9, 9, 9], "", list(tokens), "", new, False, None, timing))
    count = registry.get_sample_value("inferd:inter_token_latency_seconds_count", {"model_name": "m"})
    assert count == 5


def test_tokens_that_came_with_the_first_share_the_time_since_the_engine_saw_it() -> None:
    metrics, registry = _metrics_for_unit_test()
    tracker = _RequestTracker("r", 3, metrics)
    # A reader that fell 0.4 s behind gets the first five tokens at once.
    timing = RequestMetrics(arrival_time=0.0, first_token_time=time.monotonic() - 0.4)
    tracker.on_output(RequestOutput("r", [9], "", [1, 2, 3, 4, 5], "", [1, 2, 3, 4, 5], False, None, timing))

    def value(name: str) -> float | None:
        return registry.get_sample_value(f"inferd:inter_token_latency_seconds_{name}", {"model_name": "m"})

    assert value("count") == 4
    assert 0.4 <= value("sum") < 1.0  # type: ignore[operator]


def test_tgis_metric_names_count_the_same_requests() -> None:
    """TGI's names, exported beside inferd's for dashboards written for TGI: its counters without a
    _total suffix (untyped), failures by kind (a 429 is TGI's overloaded), histograms of successes only, and
    the queue gauges."""
    metrics, registry = _metrics_for_unit_test()

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"model_name": "m", **labels})

    for reason in ("stop", "length", "error", "abort", "timeout"):
        metrics.count_arrived()
        metrics.record_finished(FinishedRequest(reason, 4, 3, 0.1, 0.3, 0.01, 0.05, 0.2, max_tokens=8))
    metrics.count_rejected()  # refused at the door: counted as it arrives and as it fails
    metrics.count_arrived()
    metrics.count_rejected(arrived=True)  # refused by the engine's queue after it was counted
    assert value("tgi_request_count") == 7 and value("tgi_request_success") == 2
    metrics.count_arrived()  # in flight: counted, neither a success nor a failure yet
    kinds = ("generation", "abort", "timeout", "overloaded")
    ended = (value("tgi_request_success") or 0) + sum(value("tgi_request_failure", err=k) or 0 for k in kinds)
    assert value("tgi_request_count") == ended + 1
    failures = {kind: value("tgi_request_failure", err=kind) for kind in ("generation", "abort", "timeout")}
    assert failures == {"generation": 1, "abort": 1, "timeout": 1}
    assert value("tgi_request_failure", err="overloaded") == 2
    assert value("inferd:requests_rejected_total") == 2
    assert value("tgi_request_duration_count") == 2
    assert value("tgi_request_duration_sum") == pytest.approx(0.6)
    assert value("tgi_request_queue_duration_sum") == pytest.approx(0.02)
    assert value("tgi_request_inference_duration_sum") == pytest.approx(0.5)
    assert value("tgi_request_mean_time_per_token_duration_sum") == pytest.approx(0.2)
    assert value("tgi_request_input_length_sum") == 8 and value("tgi_request_generated_tokens_sum") == 6
    assert value("tgi_request_max_new_tokens_sum") == 16
    assert value("tgi_queue_size") == 2 and value("tgi_batch_current_size") == 1
    text = generate_latest(registry).decode()
    # TGI's exact name: no _total on the type line or the sample.
    assert "# TYPE tgi_request_count untyped" in text and 'tgi_request_count{model_name="m"} 8.0' in text


def test_a_prefix_gives_the_engine_metrics_vllms_names() -> None:
    """--metrics-prefix vllm: the families read by vLLM's dashboards, autoscalers and the Gateway
    API's endpoint picker under their names there; TGI's and the HTTP layer's keep theirs."""
    registry = CollectorRegistry()
    stats = EngineStats(num_running=1, num_waiting=2, kv_usage=0.5, num_preemptions=0, prefix_queries=0,
                        prefix_hits=0)  # fmt: skip
    metrics = ServerMetrics(registry, "m", lambda: stats, prefix="vllm")
    metrics.record_finished(FinishedRequest("stop", 4, 2, 0.1, 0.3, 0.01))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"model_name": "m", **labels})

    assert value("vllm:num_requests_waiting") == 2 and value("vllm:kv_cache_usage_perc") == 0.5
    assert value("vllm:e2e_request_latency_seconds_count") == 1
    assert value("vllm:request_success_total", finished_reason="stop") == 1  # vLLM's own name
    assert value("vllm:requests_finished_total", finish_reason="stop") == 1
    assert value("tgi_queue_size") == 2
    assert "inferd:" not in generate_latest(registry).decode()
    # The same families for a model added later (a repository's LLM).
    other = metrics.for_model("other", lambda: stats)
    other.record_finished(FinishedRequest("length", 4, 2, 0.1, 0.3, 0.01))
    labels = {"model_name": "other", "finished_reason": "length"}
    assert registry.get_sample_value("vllm:request_success_total", labels) == 1


async def test_the_prefix_flag_reaches_the_served_metrics(tiny_llama, capsys) -> None:  # type: ignore[no-untyped-def]
    from inferd.cli import build_parser
    from inferd.engine.async_llm import AsyncLLM
    from inferd.server.app import create_app
    from inferd.server.serve_cli import server_config

    config = server_config(build_parser().parse_args(["serve", "--metrics-prefix", "vllm"]))
    assert config.metrics_prefix == "vllm"
    assert server_config(build_parser().parse_args(["serve"])).metrics_prefix == "inferd"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--metrics-prefix", "vllm:"])
    assert "a metric name prefix is letters, digits and underscores" in capsys.readouterr().err
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    try:
        transport = httpx.ASGITransport(app=create_app(llm, config))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            text = (await client.get("/metrics")).text
    finally:
        llm.shutdown()
    assert 'vllm:num_requests_running{model_name="' in text and "inferd:" not in text


async def test_a_request_refused_before_routing_counts_under_its_route() -> None:
    """A 413 for the body and a 401 for the key are answered by middleware before the router runs:
    they counted under `none`, the label of paths no route serves. The routes come in a router
    included in another, as the servers' do: FastAPI (from 0.16x) keeps an included router as one
    entry that picks among its routes only as it handles a request, and those were all `none`."""
    from fastapi import APIRouter, FastAPI

    from inferd.server.app import render_error_for_path as render
    from inferd.server.auth import RequireApiKey
    from inferd.server.http_metrics import HttpMetricFamilies, HttpMetrics
    from inferd.server.limits import BodySizeLimit

    registry = CollectorRegistry()
    app, outer, inner = FastAPI(), APIRouter(), APIRouter()

    @inner.post("/v1/things/{name}")
    async def thing(name: str) -> dict[str, str]:
        return {"name": name}

    outer.include_router(inner)
    app.include_router(outer)

    app.add_middleware(BodySizeLimit, max_bytes=10, render=render)
    app.add_middleware(RequireApiKey, api_key="k", render=render)
    app.add_middleware(HttpMetrics, families=HttpMetricFamilies(registry))
    keyed = {"Authorization": "Bearer k"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.post("/v1/things/a", content=b"{}", headers=keyed)).status_code == 200
        assert (await client.post("/v1/things/a", content=b"x" * 100, headers=keyed)).status_code == 413
        assert (await client.post("/v1/things/a", content=b"{}")).status_code == 401
        assert (await client.get("/v1/things/a", headers=keyed)).status_code == 405
        assert (await client.post("/v1/other", headers=keyed)).status_code == 404

    def count(handler: str, method: str, status: str) -> float | None:
        labels = {"handler": handler, "method": method, "status": status}
        return registry.get_sample_value("http_requests_total", labels)

    assert count("/v1/things/{name}", "POST", "2xx") == 1
    assert count("/v1/things/{name}", "POST", "4xx") == 2  # the 413 and the 401
    assert count("/v1/things/{name}", "GET", "4xx") == 1
    assert count("none", "POST", "4xx") == 1


def test_an_embedding_request_ran_for_its_prompt() -> None:
    """An embedding has no output token, so no decode time: its inference time (first scheduling
    to its end) is its prefill's, observed beside its queue and prefill times, TGI's too."""
    metrics, registry = _metrics_for_unit_test()
    metrics.record_finished(FinishedRequest("stop", 4, 0, None, 0.3, 0.01, 0.05))

    def count(name: str) -> float | None:
        return registry.get_sample_value(f"{name}_count", {"model_name": "m"})

    assert count("inferd:request_prefill_time_seconds") == count("inferd:request_inference_time_seconds") == 1
    assert registry.get_sample_value("inferd:request_inference_time_seconds_sum", {"model_name": "m"}) == 0.05
    assert count("tgi_request_inference_duration") == 1
    assert count("inferd:request_decode_time_seconds") == 0
