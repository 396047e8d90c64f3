"""AsyncLLM with the core in a thread and in a child process: same answers, aborts free blocks."""

from __future__ import annotations

import asyncio
import time

import pytest

from inferd import LLM, SamplingParams
from inferd.engine.async_llm import AsyncLLM

PROMPTS = ["To be, or not", "Whether 'tis nobler", "Café 東京", "The quick brown fox"]


async def _collect(
    llm: AsyncLLM, request_id: str, prompt: str, params: SamplingParams
) -> tuple[str, str, list[int]]:
    streamed = ""
    async for out in llm.generate(request_id, prompt, params):
        streamed += out.new_text
    return streamed, out.text, out.token_ids


async def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("engine_process", [False, True], ids=["thread", "process"])
async def test_async_engine_matches_offline_and_frees_on_abort(tiny_llama, engine_process: bool) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.0, stop=["xq"])
    expected = LLM(tiny_llama, kv_cache_memory="16MiB").generate(PROMPTS, params)
    llm = AsyncLLM.from_options(tiny_llama, engine_process=engine_process, kv_cache_memory="16MiB")
    llm.start()
    try:
        results = await asyncio.gather(*[_collect(llm, f"r{i}", p, params) for i, p in enumerate(PROMPTS)])
        for (streamed, final, token_ids), exp in zip(results, expected, strict=True):
            assert streamed == final == exp.text
            assert token_ids == exp.token_ids

        stream = llm.generate("long", "To be", SamplingParams(max_tokens=200, ignore_eos=True))
        async for _ in stream:
            break
        assert llm.stats().kv_usage > 0
        await stream.aclose()
        await _wait_for(lambda: llm.stats().kv_usage == 0.0 and llm.stats().num_running == 0)
    finally:
        llm.shutdown()


async def test_a_consumer_that_falls_behind_gets_merged_outputs(tiny_llama) -> None:
    """Outputs that pile up while the consumer is busy arrive as one: deltas concatenated, nothing
    lost or repeated, the last one finished."""
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=1)
    expected = LLM(tiny_llama, kv_cache_memory="16MiB").generate(PROMPTS[:1], params)[0]
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="16MiB")
    llm.start()
    try:
        received = []
        async for out in llm.generate("slow", PROMPTS[0], params):
            received.append(out)
            if len(received) == 1:
                # A slow client: the engine runs on while this consumer does not read.
                await _wait_for(lambda: not llm.engine.core.has_unfinished())
                # The backlog waits as one output (each holds the whole history: one a step
                # would grow with the square of the output's length).
                assert llm._streams["slow"].qsize() == 1
        assert received[-1].finished
        assert len(received) < 40  # the backlog came as one output, not one per token
        assert "".join(o.new_text for o in received) == received[-1].text == expected.text
        assert [t for o in received for t in o.new_token_ids] == expected.token_ids
        assert [lp.token_id for o in received for lp in o.new_logprobs] == expected.token_ids
    finally:
        llm.shutdown()


async def test_a_backlog_is_not_merged_into_a_timeout(tiny_llama, monkeypatch) -> None:
    """The protocol adapters raise on a timeout or an error, so the tokens queued before it must
    reach the reader as their own output first."""
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="16MiB")
    core_step = llm.engine.core.step

    def slow_step() -> list:
        time.sleep(0.005)  # 400 steps take 2 s or more, whatever the machine: the deadline comes first
        return core_step()

    monkeypatch.setattr(llm.engine.core, "step", slow_step)
    llm.start()
    try:
        params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        deadline = time.monotonic() + 0.5
        received = []
        async for out in llm.generate("late", PROMPTS[0], params, deadline):
            received.append(out)
            if len(received) == 1:
                await _wait_for(lambda: not llm.engine.core.has_unfinished())  # timed out meanwhile
        final = received[-1]
        assert final.finish_reason == "timeout" and final.new_token_ids == []
        assert len(received) == 3 and not received[1].finished
        assert [t for o in received[:-1] for t in o.new_token_ids] == final.token_ids
    finally:
        llm.shutdown()


async def test_deadlines_of_finished_requests_are_not_kept_while_the_engine_stays_busy(tiny_llama) -> None:
    """Under a long timeout, each request served left its deadline behind until the engine was
    idle: an engine never idle kept one per request it ever served."""
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="16MiB")
    llm.start()
    try:
        far = time.monotonic() + 3600
        busy = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        background = asyncio.ensure_future(_drain(llm.generate("busy", PROMPTS[0], busy, far)))
        short = SamplingParams(max_tokens=1, temperature=0.0)
        for index in range(150):
            async for _ in llm.generate(f"short-{index}", PROMPTS[1], short, far):
                pass
        assert llm.engine.has_unfinished()  # never idle meanwhile
        assert len(llm._deadlines) <= 2 * 2 + 64 + 1
        background.cancel()
    finally:
        llm.shutdown()


async def _drain(outputs) -> None:  # type: ignore[no-untyped-def]
    async for _ in outputs:
        pass


def test_the_engine_process_leaves_no_socket_folder_behind(tiny_llama, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    llm = AsyncLLM.from_options(tiny_llama, engine_process=True, kv_cache_memory="16MiB")
    assert any(path.name.startswith("inferd-") for path in tmp_path.iterdir())
    llm.start()
    llm.shutdown()
    assert list(tmp_path.iterdir()) == []
