"""The periodic engine line (`--log-stats-interval`) and the request log switch
(`--disable-log-requests`), and the engine counts the line's rates come from."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import httpx
from server_process import run_server

from inferd import LLM, SamplingParams
from inferd.cli import build_parser
from inferd.engine.core import EngineStats
from inferd.server.serve_cli import server_config
from inferd.server.stats_log import stats_line


def test_the_engine_counts_prompt_tokens_computed_and_tokens_generated(tiny_llama: Path) -> None:
    llm = LLM(tiny_llama, kv_cache_memory="8MiB", block_size=8, max_num_batched_tokens=16)
    prompt = list(range(10, 50))  # 40 tokens: computed in chunks of at most 16
    greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], greedy)
    first = llm.engine.stats()
    assert (first.prompt_tokens_computed, first.generated_tokens) == (40, 5)
    llm.generate([prompt], greedy)  # 32 of its tokens come from the prefix cache
    second = llm.engine.stats()
    assert second.prompt_tokens_computed - first.prompt_tokens_computed == 40 - 32
    assert second.generated_tokens - first.generated_tokens == 5


def test_the_line_gives_the_intervals_rates_and_says_nothing_when_idle() -> None:
    idle = EngineStats(0, 0, 0.0, 0, 100, 20, prompt_tokens_computed=500, generated_tokens=300)
    assert stats_line(idle, idle, 10.0) is None
    busy = dataclasses.replace(
        idle, num_running=3, num_waiting=1, kv_usage=0.25, prefix_queries=200, prefix_hits=70,
        prompt_tokens_computed=1500, generated_tokens=800,
    )  # fmt: skip
    assert stats_line(idle, busy, 10.0) == (
        "engine: prompt 100.0 tok/s, generation 50.0 tok/s, running 3, waiting 1, KV cache 25.0%, "
        "prefix cache hits 50.0%"
    )
    waiting_only = dataclasses.replace(idle, num_waiting=2)
    assert "prefix cache hits -" in str(stats_line(idle, waiting_only, 1.0))


def test_the_flags() -> None:
    def config(*flags: str):  # type: ignore[no-untyped-def]
        return server_config(build_parser().parse_args(["serve", *flags]))

    assert config().log_stats_interval_s == 10.0
    assert config("--log-stats-interval", "2.5").log_stats_interval_s == 2.5
    assert config("--disable-log-stats").log_stats_interval_s == 0.0


def test_a_working_server_logs_its_engine_line_and_no_request_lines_when_asked(tiny_llama: Path) -> None:
    args = ("--kv-cache-memory", "8MiB", "--log-stats-interval", "0.2", "--disable-log-requests")
    with run_server(tiny_llama, *args) as server:
        body = {"model": server.model, "prompt": "To be", "max_tokens": 200, "ignore_eos": True}
        answer = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60).json()
        line = server.wait_for_log("engine: prompt")
        assert "generation" in line and "KV cache" in line
        time.sleep(0.5)  # a finished request would have logged by now
        assert f"request {answer['id']}" not in server.log_text()


async def test_a_failed_reading_is_skipped_and_the_lines_go_on(caplog) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import logging

    from inferd.server.stats_log import log_engine_stats

    readings = iter(
        [EngineStats(0, 0, 0.0, 0, 0, 0), RuntimeError("engine gone"), EngineStats(2, 0, 0.5, 0, 0, 0)]
    )

    def read() -> EngineStats:
        value = next(readings, EngineStats(0, 0, 0.0, 0, 0, 0))
        if isinstance(value, Exception):
            raise value
        return value

    with caplog.at_level(logging.INFO, logger="inferd.server"):
        task = asyncio.create_task(log_engine_stats(read, 0.01))
        await asyncio.sleep(0.1)
        task.cancel()
    assert "engine stats unreadable" in caplog.text and "running 2" in caplog.text
