"""Engine-side reliability: the admission bound, deadlines that free blocks within one step, a fault
in one request's processing that fails that request alone, and a dead engine loop that fails every
waiter at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from inferd import SamplingParams
from inferd.engine.admission import AdmissionQueue, EngineOverloadedError, QueueLimits
from inferd.engine.async_llm import AsyncLLM, EngineDeadError
from inferd.engine.llm_engine import LLMEngine
from inferd.engine.process_engine import EngineProcessDied
from inferd.engine.request import Request

LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)


def test_admission_refuses_past_either_bound_and_counts_back_down() -> None:
    queue = AdmissionQueue(QueueLimits(max_requests=2, max_tokens=10))
    queue.admit(4)
    queue.admit(4)
    with pytest.raises(EngineOverloadedError) as refused:
        queue.admit(1)  # third request
    assert refused.value.retry_after_s >= 1
    queue.leave(4)
    with pytest.raises(EngineOverloadedError):
        queue.admit(7)  # 4 + 7 tokens > 10
    queue.admit(6)
    assert (queue.num_requests, queue.num_tokens) == (2, 10)
    queue.leave(4)
    queue.leave(6)
    queue.admit(50)  # alone in the queue, a prompt over the token bound still gets in
    assert (queue.num_requests, queue.num_tokens) == (1, 50)


def test_unbounded_queue_never_refuses() -> None:
    queue = AdmissionQueue()
    for _ in range(1000):
        queue.admit(10_000)
    assert queue.num_requests == 1000


async def _run(llm: AsyncLLM, request_id: str, params: SamplingParams, deadline: float | None = None) -> Any:
    outputs = [out async for out in llm.generate(request_id, "To be, or not", params, deadline)]
    return outputs[-1]


def _recording_steps(llm: AsyncLLM) -> list[float]:
    """Wraps the engine's step to record when each one starts, and to take 2 ms or more, so the
    tiny model's 400 tokens outlast a 0.3 s deadline on any machine."""
    starts: list[float] = []
    step = llm.engine.step

    def timed_step() -> Any:
        starts.append(time.monotonic())
        time.sleep(0.002)
        return step()

    llm.engine.step = timed_step  # type: ignore[method-assign]
    return starts


async def test_timed_out_request_is_aborted_and_its_blocks_freed_within_one_step(tiny_llama: Path) -> None:
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    starts = _recording_steps(llm)
    llm.start()
    try:
        deadline = time.monotonic() + 0.3
        out = await _run(llm, "slow", LONG, deadline)
        stats = llm.stats()
        assert out.finished and out.finish_reason == "timeout"
        assert 0 < len(out.token_ids) < 400
        # Blocks are free by the time the client hears of it, and at most one step (the one already
        # running when the deadline passed) started after the deadline.
        assert stats.kv_usage == 0.0 and stats.num_running == stats.num_waiting == 0
        assert sum(start >= deadline for start in starts) <= 1
    finally:
        llm.shutdown()


async def test_queued_request_times_out_where_it_waits(tiny_llama: Path) -> None:
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB", max_num_seqs=1)
    step = llm.engine.step

    def slow_step() -> Any:
        time.sleep(0.005)  # the running request's 200 steps outlast the waiting one's deadline anywhere
        return step()

    llm.engine.step = slow_step  # type: ignore[method-assign]
    llm.start()
    try:
        running = asyncio.ensure_future(_run(llm, "running", SamplingParams(max_tokens=200, ignore_eos=True)))
        await asyncio.sleep(0.05)
        waiting = await _run(llm, "waiting", LONG, time.monotonic() + 0.1)
        assert waiting.finish_reason == "timeout" and waiting.token_ids == []
        assert (await running).finish_reason == "length"
        assert llm.stats().kv_usage == 0.0
    finally:
        llm.shutdown()


async def test_admission_limit_refuses_at_once_and_releases_on_first_token(tiny_llama: Path) -> None:
    llm = AsyncLLM(
        LLMEngine.from_options(tiny_llama, kv_cache_memory="8MiB", max_num_seqs=1),
        QueueLimits(max_requests=1),
    )
    llm.start()
    try:
        first = asyncio.ensure_future(_run(llm, "first", SamplingParams(max_tokens=100, ignore_eos=True)))
        await asyncio.sleep(0)  # admitted: the generator has started
        for _ in range(200):
            if llm.admission.num_requests == 0:
                break  # its first token came: it is running, no longer queued
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(_run(llm, "second", SamplingParams(max_tokens=4)))
        await asyncio.sleep(0.01)
        with pytest.raises(EngineOverloadedError):
            await _run(llm, "third", SamplingParams(max_tokens=4))
        assert (await first).finish_reason == "length"
        assert (await second).finish_reason == "length"
        assert (llm.admission.num_requests, llm.admission.num_tokens) == (0, 0)
    finally:
        llm.shutdown()


def _greedy(seed_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=seed_tokens, temperature=0.0, ignore_eos=True)


def _finish(engine: LLMEngine) -> dict[str, Any]:
    finals = {}
    for _ in range(500):
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        if not engine.has_unfinished():
            return finals
    raise AssertionError("the engine did not finish its requests")


def test_logits_processor_failure_fails_only_its_request(tiny_llama: Path, monkeypatch) -> None:
    alone = LLMEngine.from_options(tiny_llama, kv_cache_memory="8MiB")
    alone.add_request("good", "To be, or not", _greedy(12))
    expected = _finish(alone)["good"].token_ids

    import inferd.sample.sampler as sampler

    real_bias = sampler.apply_logit_bias

    def failing_bias(logits: Any, request: Request) -> None:
        if request.request_id == "bad":
            raise RuntimeError("logits processor exploded")
        real_bias(logits, request)

    monkeypatch.setattr(sampler, "apply_logit_bias", failing_bias)
    engine = LLMEngine.from_options(tiny_llama, kv_cache_memory="8MiB")
    engine.add_request("good", "To be, or not", _greedy(12))
    engine.add_request("bad", "Whether 'tis nobler", SamplingParams(max_tokens=12, logit_bias={3: 1.0}))
    finals = _finish(engine)
    assert finals["bad"].finish_reason == "error"
    assert "logits processor exploded" in finals["bad"].error
    assert finals["good"].finish_reason == "length" and finals["good"].token_ids == expected
    assert engine.stats().kv_usage == 0.0


def test_the_offline_api_raises_for_a_request_the_engine_failed(tiny_llama: Path, monkeypatch) -> None:
    """LLM.generate, as vLLM's: an engine failure fails the call, naming the prompt, rather than
    an empty answer marked "error" that code reading .text would take for one; the engine is
    left clean for the next call. An out-of-vocabulary logit_bias id is refused before it runs."""
    import inferd.sample.sampler as sampler
    from inferd import LLM

    real_bias = sampler.apply_logit_bias

    def failing_bias(logits: Any, request: Request) -> None:
        if 3 in request.params.logit_bias:
            raise RuntimeError("logits processor exploded")
        real_bias(logits, request)

    monkeypatch.setattr(sampler, "apply_logit_bias", failing_bias)
    llm = LLM(tiny_llama, kv_cache_memory="8MiB")
    params = [_greedy(4), SamplingParams(max_tokens=4, logit_bias={3: 1.0})]
    with pytest.raises(RuntimeError, match="prompt 1: .*logits processor exploded"):
        llm.generate(["To be, or not", "Whether 'tis nobler"], params)
    # Asked to, it gives the failed output back instead (a benchmark counts such failures).
    kept = llm.generate(["To be, or not", "Whether 'tis nobler"], params, raise_on_error=False)
    assert [out.finish_reason for out in kept] == ["length", "error"] and "exploded" in str(kept[1].error)
    assert len(llm.generate(["To be, or not"], _greedy(4))[0].token_ids) == 4
    vocab = llm.engine.config.model.vocab_size
    with pytest.raises(ValueError, match=rf"token ids out of range \[0, {vocab}\): \[{vocab}\]"):
        llm.generate(["To be"], SamplingParams(max_tokens=4, logit_bias={vocab: 1.0}))


def test_output_processing_failure_fails_only_its_request(tiny_llama: Path) -> None:
    engine = LLMEngine.from_options(tiny_llama, kv_cache_memory="8MiB")
    engine.add_request("good", "To be, or not", _greedy(12))
    engine.add_request("bad", "Whether 'tis nobler", _greedy(12))

    def broken_detokenizer(token_id: int) -> str:
        raise UnicodeError("detokenizer exploded")

    engine.output_processor._states["bad"].detokenizer.add = broken_detokenizer  # type: ignore[method-assign]
    finals = _finish(engine)
    assert finals["bad"].finish_reason == "error" and "detokenizer exploded" in finals["bad"].error
    assert finals["good"].finish_reason == "length" and len(finals["good"].token_ids) == 12
    assert engine.stats().kv_usage == 0.0 and engine.stats().num_running == 0


async def test_dead_engine_loop_fails_every_waiter_and_refuses_new_requests(tiny_llama: Path) -> None:
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    engine = llm.engine
    step = engine.step
    calls = 0

    def dying_step() -> Any:
        nonlocal calls
        # Count only steps with all three requests in: on a busy machine the engine thread can
        # take several steps before the last request has even registered.
        stats = engine.stats()
        if stats.num_running + stats.num_waiting == 3:
            calls += 1
        if calls > 3:
            raise EngineProcessDied("the engine core is gone")
        return step()

    llm.engine.step = dying_step  # type: ignore[method-assign]
    llm.start()
    try:
        outs = await asyncio.wait_for(
            asyncio.gather(*[_run(llm, f"r{i}", LONG) for i in range(3)]), timeout=30
        )
        assert all(out.finish_reason == "error" and "engine core is gone" in out.error for out in outs)
        # The tokens made before the engine died are still counted (request log, token counters).
        assert all(len(out.token_ids) >= 3 for out in outs)
        assert not llm.is_alive
        with pytest.raises(EngineDeadError):
            await _run(llm, "late", LONG)
    finally:
        llm.shutdown()
