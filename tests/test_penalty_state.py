"""The penalties of a batch at once (`sample/penalty_state.py`), against transformers' repetition
penalty and OpenAI's presence and frequency penalties applied a row at a time, step after step."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
import transformers
from launch_recorder import record_launches_over_unread
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from inferd import LLM
from inferd.engine.request import Request
from inferd.sample import sampler
from inferd.sample.penalty_state import HostPenalties, PenaltyState
from inferd.sample.penalty_tables import PenaltyTables
from inferd.sampling_params import SamplingParams
from inferd.worker.model_runner import LaunchedStep, ModelRunner

VOCAB = 300


def _reference(logits: torch.Tensor, request: Request) -> torch.Tensor:
    """One row as transformers (repetition, over prompt and output) and OpenAI (presence and
    frequency, over the output: ``logit - (frequency * count + presence)``) describe them."""
    params, row = request.params, logits.clone().unsqueeze(0)
    if params.repetition_penalty != 1.0:
        history = torch.tensor([request.prompt_token_ids + request.output_token_ids])
        row = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(history, row)
    counts = torch.bincount(torch.tensor(request.output_token_ids, dtype=torch.long), minlength=VOCAB).float()
    return row[0] - (params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float())


def _request(request_id: str, rng: random.Random, **penalties: float) -> Request:
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 40))]
    return Request(request_id, prompt, SamplingParams(**penalties), frozenset(), 100)


FORMS: dict[str, type[PenaltyState]] = {"host": HostPenalties, "tables": PenaltyTables}


@pytest.fixture(params=list(FORMS))
def form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> type[PenaltyState]:
    """Each form the histories are kept in; an engine's sampler on the CPU keeps them in it too
    (it keeps them on the host unless on a GPU)."""
    chosen = FORMS[request.param]
    monkeypatch.setattr(sampler, "HostPenalties", chosen)
    return chosen


def test_a_mixed_batch_matches_the_row_by_row_penalties_step_after_step(form: type[PenaltyState]) -> None:
    rng = random.Random(0)
    requests = [
        _request("plain", rng),
        _request("repetition", rng, repetition_penalty=1.3),
        _request("below one", rng, repetition_penalty=0.7),
        _request("presence", rng, presence_penalty=0.8),
        _request("frequency", rng, frequency_penalty=-0.6),
        _request("all", rng, repetition_penalty=1.1, presence_penalty=-0.4, frequency_penalty=1.5),
    ]
    state = form()
    for step in range(12):
        if step == 6:  # an id that comes back as a newer request's starts from its own history
            requests[5] = _request("all", rng, repetition_penalty=2.0, frequency_penalty=0.5)
            # More outputs than the old one had counted: only its identity tells them apart.
            requests[5].output_token_ids = [rng.randrange(VOCAB) for _ in range(40)]
        order = rng.sample(requests, len(requests))  # rows move between steps
        logits = torch.randn(len(order), VOCAB, generator=torch.Generator().manual_seed(step)) * 3
        expected = torch.stack([_reference(logits[i], r) for i, r in enumerate(order)])
        state.apply(logits, order)
        torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
        for request in requests:  # repeats are likely: few tokens to choose from
            request.output_token_ids.extend(
                rng.choice([1, 2, rng.randrange(VOCAB)]) for _ in range(rng.randrange(3))
            )
    assert state.num_requests == 5
    state.forget(["all", "presence", "unknown"])
    assert state.num_requests == 3


def test_finished_requests_leave_the_engines_penalty_state(tiny_llama, form: type[PenaltyState]) -> None:
    llm = LLM(tiny_llama, kv_cache_memory="8MiB")
    penalized = SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=1.3, ignore_eos=True)
    engine = llm.engine
    for prompt in ([1, 2, 3], [4, 5, 6], [7, 8, 9]):
        engine.add_request(str(prompt), prompt, penalized)
    engine.step()
    state = engine.core.runner.sampler._penalties
    assert isinstance(state, form) and state.num_requests == 3
    while engine.has_unfinished():
        engine.step()
    assert state.num_requests == 0  # let go by the step that finished them
    engine.add_request("aborted", [5, 6, 7], penalized)
    engine.step()
    engine.abort(["aborted"])
    assert state.num_requests == 1
    engine.step()  # an abort between steps: let go by the next one
    assert state.num_requests == 0


def test_drawn_tokens_count_before_the_host_reads_them(form: type[PenaltyState]) -> None:
    """As under asynchronous scheduling: each step samples with the last step's token still unread
    on the host, so only the state's counting of the drawn tokens can hold it."""
    rng = random.Random(1)
    requests = [
        _request("repetition", rng, repetition_penalty=1.4),
        _request("presence", rng, presence_penalty=0.9),
        _request("all", rng, repetition_penalty=0.8, presence_penalty=0.3, frequency_penalty=0.7),
    ]
    state = form()
    unread: dict[str, int] = {}
    for step in range(10):
        logits = torch.randn(len(requests), VOCAB, generator=torch.Generator().manual_seed(step)) * 3
        expected = []
        for i, request in enumerate(requests):
            # The reference sees the whole output, the unread token too; the state sees what the host has.
            whole = Request(request.request_id, request.prompt_token_ids, request.params, frozenset(), 100)
            whole.output_token_ids = request.output_token_ids + (
                [unread[request.request_id]] if unread else []
            )
            expected.append(_reference(logits[i], whole))
            request.num_inflight_tokens = 2 if unread else 1  # this step's token, and the last one's
        penalized = state.apply(logits, requests)
        torch.testing.assert_close(logits, torch.stack(expected), rtol=1e-6, atol=1e-6)
        drawn = torch.tensor([rng.choice([1, 2, rng.randrange(VOCAB)]) for _ in requests])
        state.count_sampled(penalized, drawn)
        for request in requests:  # the host reads the last step's tokens only now
            if unread:
                request.output_token_ids.append(unread[request.request_id])
        unread = {r.request_id: int(t) for r, t in zip(requests, drawn, strict=True)}


def test_counts_ahead_of_the_sampled_position_are_rebuilt_from_the_host(form: type[PenaltyState]) -> None:
    """A step lost after its tokens were counted is scheduled again: the request samples the same
    output position, and its counts must not hold the lost token."""
    rng = random.Random(2)
    request = _request("r", rng, repetition_penalty=1.5, frequency_penalty=1.0)
    request.output_token_ids = [3, 4, 4]
    state = form()
    state.count_sampled(state.apply(torch.zeros(1, VOCAB), [request]), torch.tensor([9]))
    # The step's token 9 never reached the host: the request samples position 3 again.
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0))
    expected = _reference(logits[0], request)
    state.apply(logits, [request])
    torch.testing.assert_close(logits[0], expected, rtol=1e-6, atol=1e-6)


def test_idle_requests_give_their_rows_back_past_the_limit() -> None:
    rng = random.Random(3)
    made = [_request(f"r{i}", rng, repetition_penalty=1.3, presence_penalty=0.5) for i in range(12)]
    for request in made:
        request.output_token_ids = [rng.randrange(VOCAB) for _ in range(5)]
    state = PenaltyTables(row_limit=8)
    state.apply(torch.zeros(8, VOCAB), made[:8])
    assert state.num_rows == 8
    made[0].num_inflight_tokens = 1  # a token in flight: its counts cannot be rebuilt, so they stay
    state.apply(torch.zeros(4, VOCAB), made[8:])
    assert state.num_rows == 8 and state.num_requests == 5  # r1 to r7 went, not r0
    # A request that went comes back with its counts rebuilt from the host's tokens.
    made[0].num_inflight_tokens = 0
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1))
    expected = torch.stack([_reference(logits[0], made[0]), _reference(logits[1], made[3])])
    state.apply(logits, [made[0], made[3]])
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    # Without a limit the tables grow instead.
    unlimited = PenaltyTables()
    unlimited.apply(torch.zeros(8, VOCAB), made[:8])
    unlimited.apply(torch.zeros(4, VOCAB), made[8:])
    assert unlimited.num_rows == 16 and unlimited.num_requests == 12


def test_a_failed_step_fails_its_requests_alone_in_the_steps_after_it(form: type[PenaltyState]) -> None:
    """Under asynchronous scheduling the step after a failed one is launched before the failure is
    read: the requests of the failed step, whose drawn tokens were never counted, fail there alone,
    and a request beside them is penalized as ever."""
    rng = random.Random(5)
    old = _request("old", rng, repetition_penalty=1.5, frequency_penalty=0.5)
    old.output_token_ids = [3, 3]
    state = form()
    take = form._take

    def fails(*args: Any) -> None:
        raise MemoryError("out of device memory (simulated)")

    form._take = fails  # type: ignore[method-assign]
    try:
        with pytest.raises(MemoryError):
            state.apply(torch.zeros(1, VOCAB), [old])
    finally:
        form._take = take  # type: ignore[method-assign]
    assert state.num_requests == 0  # the half-made history went
    # The next step: old's token of the failed step is in flight, uncounted; new is new.
    old.num_inflight_tokens = 2
    new = _request("new", rng, presence_penalty=0.7, repetition_penalty=1.2)
    new.output_token_ids = [4]
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(3))
    untouched = logits[0].clone()
    expected = _reference(logits[1], new)
    penalized = state.apply(logits, [old, new])
    assert list(penalized.failed) == [0] and "position 3" in penalized.failed[0]
    assert penalized.rows == [1] and torch.equal(logits[0], untouched)
    torch.testing.assert_close(logits[1], expected, rtol=1e-6, atol=1e-6)
    assert state.num_requests == 1


def test_one_failed_step_fails_only_its_own_requests_in_an_engine(
    tiny_model_factory, monkeypatch, form: type[PenaltyState]
) -> None:
    """A new penalized request a step, under asynchronous scheduling; the penalties of one step
    fail (as the tables' growth out of device memory would): the requests of that step end with
    its error, and every request after it ends as asked."""
    take, calls = form._take, []

    def fails_once(self: PenaltyState, *args: Any) -> None:
        calls.append(1)
        if len(calls) == 4:
            raise MemoryError("out of device memory (simulated)")
        take(self, *args)

    monkeypatch.setattr(form, "_take", fails_once)
    llm = LLM(tiny_model_factory("qwen3"), device="cpu", kv_cache_memory="8MiB", async_scheduling=True)
    engine = llm.engine
    params = SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.3, ignore_eos=True)
    finished: dict[str, Any] = {}
    for step in range(40):
        if step < 12:
            engine.add_request(f"r{step}", [5 + step, 6, 7], params, final_only=True)
        finished.update((out.request_id, out) for out in engine.step() if out.finished)
    failed = {rid for rid, out in finished.items() if out.finish_reason != "length"}
    assert len(finished) == 12 and 0 < len(failed) <= 4 and f"r{11}" not in failed
    assert all("simulated" in (finished[rid].error or "") for rid in failed)


def test_a_penalized_request_draws_one_row_a_step(form: type[PenaltyState]) -> None:
    request = _request("r", random.Random(4), presence_penalty=0.5)
    with pytest.raises(ValueError, match="one row a step"):
        form().apply(torch.zeros(2, VOCAB), [request, request])


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_greedy_penalized_outputs_match_transformers(
    tiny_model_factory, async_scheduling: bool, form: type[PenaltyState]
) -> None:
    """transformers' greedy search with its repetition penalty, token for token; under asynchronous
    scheduling each step samples before the host has read the token before it."""
    folder = tiny_model_factory("llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llm = LLM(folder, device="cpu", kv_cache_memory="8MiB", async_scheduling=async_scheduling)
    prompts = [[5, 6, 7, 5, 6], list(range(20, 40)), [300, 12, 12]]
    params = SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=3.0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    for prompt, output in zip(prompts, outputs, strict=True):
        expected = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            repetition_penalty=3.0,
        )[0, len(prompt) :].tolist()
        assert list(output.token_ids) == expected


def test_penalized_steps_run_ahead_under_asynchronous_scheduling(
    tiny_model_factory, monkeypatch, form: type[PenaltyState]
) -> None:
    launched_over_unread = record_launches_over_unread(monkeypatch)
    llm = LLM(tiny_model_factory("qwen3"), device="cpu", kv_cache_memory="8MiB", async_scheduling=True)
    params = SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=1.2, presence_penalty=0.5,
                            frequency_penalty=0.3, ignore_eos=True)  # fmt: skip
    llm.generate([[5, 6, 7], [8, 9]], params)
    assert sum(launched_over_unread) >= 8  # each decode step but the first launched over the last


def test_a_step_lost_after_sampling_runs_again_with_the_same_penalized_outputs(
    tiny_model_factory, monkeypatch, form: type[PenaltyState]
) -> None:
    """The read of a step fails after its tokens were drawn and counted (both steps in flight are
    undone): the counts are rebuilt, and the outputs are those of a run without the failure."""
    folder = tiny_model_factory("qwen3")
    options: dict[str, Any] = {"device": "cpu", "kv_cache_memory": "8MiB", "async_scheduling": True}
    params = SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=2.0, frequency_penalty=1.0,
                            ignore_eos=True)  # fmt: skip
    prompts = [[5, 6, 7], [8, 9, 8, 9]]
    expected = [o.token_ids for o in LLM(folder, **options).generate(prompts, params)]
    llm = LLM(folder, **options)
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params, final_only=True)
    for _ in range(4):
        engine.step()
    collect = ModelRunner.collect

    def fails_once(self: ModelRunner, step: LaunchedStep) -> Any:
        monkeypatch.setattr(ModelRunner, "collect", collect)
        raise RuntimeError("device lost (simulated)")

    monkeypatch.setattr(ModelRunner, "collect", fails_once)
    with pytest.raises(RuntimeError, match="simulated"):
        engine.step()
    finished: dict[str, Any] = {}
    while engine.has_unfinished():
        finished.update((out.request_id, out) for out in engine.step() if out.finished)
    assert [finished[f"r{i}"].token_ids for i in range(2)] == expected
