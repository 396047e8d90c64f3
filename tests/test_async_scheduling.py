"""Asynchronous scheduling (step N+1 launched before step N's tokens are read) gives the same
outputs as waiting for every step, whatever the sampling options, preemption or aborts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from launch_recorder import record_launches_over_unread

from inferd import LLM, SamplingParams
from inferd.engine.outputs import RequestOutput
from inferd.engine.request import Request
from inferd.sample import sampler
from inferd.sched.output import SchedulerOutput
from inferd.worker.model_runner import LaunchedStep, ModelRunner

OPTIONS: dict[str, Any] = {"device": "cpu", "block_size": 4, "num_kv_blocks": 256, "max_model_len": 96}


def _prompts(vocab: int) -> list[list[int]]:
    lengths = [3, 11, 6, 17, 9, 2]
    return [[(7 * i + 13 * j + 5) % (vocab - 10) + 5 for j in range(n)] for i, n in enumerate(lengths)]


def _run(
    folder: Path, params: list[SamplingParams], async_scheduling: bool, **options: Any
) -> list[RequestOutput]:
    llm = LLM(folder, async_scheduling=async_scheduling, **{**OPTIONS, **options})
    outputs = llm.generate(_prompts(llm.engine.config.model.vocab_size), params)
    stats = llm.engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_usage == 0.0
    assert not llm.engine.has_unfinished()
    return outputs


def _summary(outputs: list[RequestOutput]) -> list[tuple[Any, ...]]:
    return [
        (
            o.token_ids,
            o.finish_reason,
            [(lp.token_id, round(lp.logprob, 5), lp.top) for lp in o.logprobs or []],
        )
        for o in outputs
    ]


def _each(params: SamplingParams, n: int = 6) -> list[SamplingParams]:
    return [params] * n


CASES: dict[str, list[SamplingParams]] = {
    "greedy, mixed lengths": [
        SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (1, 2, 5, 9, 14, 20)
    ],
    "seeded random, top-k/top-p/min-p": [
        SamplingParams(max_tokens=12, temperature=0.8, top_k=k, top_p=p, min_p=0.05, seed=s, ignore_eos=True)
        for k, p, s in ((0, 1.0, 1), (5, 1.0, 2), (0, 0.7, 3), (20, 0.9, 4), (0, 1.0, 5), (3, 0.5, 6))
    ],
    "logprobs": _each(SamplingParams(max_tokens=8, temperature=0.0, logprobs=3, ignore_eos=True)),
    # Stops on a token the model is likely to produce: some requests end early, one step before
    # the step already launched for them.
    "stop tokens and min_tokens": [
        SamplingParams(
            max_tokens=16, temperature=1.0, seed=i, stop_token_ids=list(range(5, 200)), min_tokens=i % 3
        )
        for i in range(6)
    ],
    # Penalties read the token history: counted on the device, the step's token before it is read.
    "penalties": _each(
        SamplingParams(
            max_tokens=10, temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5, ignore_eos=True
        )
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_async_scheduling_gives_the_same_outputs(tiny_model_factory, case: str) -> None:
    folder = tiny_model_factory("qwen3")
    expected = _summary(_run(folder, CASES[case], async_scheduling=False))
    assert _summary(_run(folder, CASES[case], async_scheduling=True)) == expected


def test_async_outputs_hold_with_preemption_chunks_and_the_context_limit(tiny_model_factory) -> None:
    folder = tiny_model_factory("llama")
    # A pool too small for all six, a 5-token step budget and a 32-token context limit: requests
    # are preempted with a token in flight, prompts split, and some stop at the context limit.
    options = {"num_kv_blocks": 14, "max_num_batched_tokens": 5, "max_model_len": 32}
    params = [SamplingParams(max_tokens=None, temperature=0.7, seed=i, ignore_eos=True) for i in range(6)]
    llm = LLM(folder, async_scheduling=True, **{**OPTIONS, **options})
    outputs = llm.generate(_prompts(llm.engine.config.model.vocab_size), params)
    assert llm.engine.stats().num_preemptions > 0
    assert {o.finish_reason for o in outputs} == {"length"}
    assert _summary(outputs) == _summary(_run(folder, params, async_scheduling=False, **options))


def test_async_engine_feeds_tokens_from_the_device(tiny_model_factory, monkeypatch) -> None:
    """The pipeline really runs ahead: decode rows take the last step's tokens on the device, a
    step is launched while the one before it is still unread, and a request whose last token is
    in flight (known from max_tokens) gets no wasted row."""
    carried: list[int] = []
    launched_over_unread: list[bool] = []
    rows: list[int] = []
    launch = ModelRunner.launch

    def spy(self: ModelRunner, out: SchedulerOutput, previous: LaunchedStep | None = None) -> LaunchedStep:
        carried.append(sum(seq.from_last_sample for seq in out.sequences))
        launched_over_unread.append(previous is not None)
        rows.append(len(out.sequences))
        return launch(self, out, previous)

    monkeypatch.setattr(ModelRunner, "launch", spy)
    folder = tiny_model_factory("qwen3")
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (1, 3, 8, 8, 5)]
    # A logit bias does not read the token history: it must not stop the pipeline.
    params.append(SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logit_bias={7: 2.0}))
    _run(folder, params, async_scheduling=True)
    assert sum(carried) > 30 and sum(launched_over_unread) > 5
    async_rows = sum(rows)
    carried.clear()
    rows.clear()
    _run(folder, params, async_scheduling=False)
    assert sum(carried) == 0
    assert async_rows == sum(rows)


def test_min_tokens_runs_ahead_and_holds_stops_back_to_the_count(tiny_model_factory, monkeypatch) -> None:
    """min_tokens counts the position sampled, the tokens in flight among them: its steps launch
    over unread ones, and a stop comes no earlier than without the pipeline. Nearly every token
    stops a request here, so each ends on the first token after its min_tokens."""
    launched_over_unread = record_launches_over_unread(monkeypatch)
    folder = tiny_model_factory("qwen3")
    vocab = LLM(folder, **OPTIONS).engine.config.model.vocab_size
    stops = list(range(3, vocab))  # tokens 0 to 2 only may come before min_tokens
    params = [
        SamplingParams(max_tokens=20, temperature=0.0, min_tokens=m, stop_token_ids=stops) for m in (1, 4, 7)
    ]
    params = params * 2
    outputs = _run(folder, params, async_scheduling=True)
    assert sum(launched_over_unread) >= 6
    for output, p in zip(outputs, params, strict=True):
        assert len(output.token_ids) == p.min_tokens + 1 and output.finish_reason == "stop"
        assert all(t < 3 for t in output.token_ids[:-1])
    assert _summary(outputs) == _summary(_run(folder, params, async_scheduling=False))


def test_abort_with_a_step_in_flight_frees_everything(tiny_model_factory) -> None:
    folder = tiny_model_factory("qwen3")
    llm = LLM(folder, async_scheduling=True, **OPTIONS)
    engine = llm.engine
    prompts = _prompts(engine.config.model.vocab_size)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(4):
        engine.step()
    assert engine.core._in_flight is not None  # the abort lands between launch and read
    aborted = engine.abort(["r1", "r4"])
    assert {o.request_id for o in aborted} == {"r1", "r4"}
    finished: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id not in ("r1", "r4"), "an aborted request got a token after its abort"
            if out.finished:
                finished[out.request_id] = out
    assert set(finished) == {"r0", "r2", "r3", "r5"}
    alone = LLM(folder, async_scheduling=False, **OPTIONS).generate(
        [prompts[i] for i in (0, 2, 3, 5)], params
    )
    assert [finished[r].token_ids for r in ("r0", "r2", "r3", "r5")] == [o.token_ids for o in alone]
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_usage == 0.0


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_step_that_fails_to_launch_can_run_again(
    tiny_model_factory, monkeypatch, async_scheduling: bool
) -> None:
    """A launch that raises (say, out of device memory on a big prompt) leaves the requests as they
    were before it was scheduled, so the next step runs it again and the outputs are unchanged."""
    folder = tiny_model_factory("qwen3")
    params = _each(SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True))
    expected = _summary(_run(folder, params, async_scheduling=False))
    llm = LLM(folder, async_scheduling=async_scheduling, **OPTIONS)
    engine = llm.engine
    for i, prompt in enumerate(_prompts(engine.config.model.vocab_size)):
        engine.add_request(f"r{i}", prompt, params[i], final_only=True)
    for _ in range(4):
        engine.step()
    launch = ModelRunner.launch

    def fails_once(
        self: ModelRunner, out: SchedulerOutput, previous: LaunchedStep | None = None
    ) -> LaunchedStep:
        monkeypatch.setattr(ModelRunner, "launch", launch)
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(ModelRunner, "launch", fails_once)
    with pytest.raises(RuntimeError, match="simulated"):
        engine.step()
    finished: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        finished.update((out.request_id, out) for out in engine.step() if out.finished)
    assert _summary([finished[f"r{i}"] for i in range(6)]) == expected


def test_a_sampling_error_in_flight_does_not_end_a_newer_request_with_the_same_id(
    tiny_model_factory, monkeypatch
) -> None:
    """Request x's logits processor fails in a step still unread when x is aborted and a new x
    comes: the error belongs to the old one only."""
    apply_logit_bias = sampler.apply_logit_bias

    def fails_for_token_9(logits: torch.Tensor, request: Request) -> None:
        if 9 in request.params.logit_bias:
            raise RuntimeError("processor bug")
        apply_logit_bias(logits, request)

    monkeypatch.setattr(sampler, "apply_logit_bias", fails_for_token_9)
    folder = tiny_model_factory("qwen3")
    engine = LLM(folder, async_scheduling=True, **OPTIONS).engine
    engine.add_request("x", [5, 6, 7], SamplingParams(max_tokens=5, temperature=0.0, logit_bias={9: 1.0}))
    assert engine.step() == []  # launched; the failure is known to the sampler, not yet read
    engine.abort(["x"])
    engine.add_request("x", [8, 9, 10], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    finished = []
    while engine.has_unfinished():
        finished += [out for out in engine.step() if out.finished]
    assert [(o.request_id, o.finish_reason, o.error, len(o.token_ids)) for o in finished] == [
        ("x", "length", None, 3)
    ]
