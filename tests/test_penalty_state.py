"""The penalties of a batch at once (`sample/penalty_state.py`), against transformers' repetition
penalty and OpenAI's presence and frequency penalties applied a row at a time, step after step."""

from __future__ import annotations

import random

import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from inferd import LLM
from inferd.engine.request import Request
from inferd.sample.penalty_state import PenaltyState
from inferd.sampling_params import SamplingParams

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


def test_a_mixed_batch_matches_the_row_by_row_penalties_step_after_step() -> None:
    rng = random.Random(0)
    requests = [
        _request("plain", rng),
        _request("repetition", rng, repetition_penalty=1.3),
        _request("below one", rng, repetition_penalty=0.7),
        _request("presence", rng, presence_penalty=0.8),
        _request("frequency", rng, frequency_penalty=-0.6),
        _request("all", rng, repetition_penalty=1.1, presence_penalty=-0.4, frequency_penalty=1.5),
    ]
    state = PenaltyState()
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


def test_finished_requests_leave_the_engines_penalty_state(tiny_llama) -> None:
    llm = LLM(tiny_llama, kv_cache_memory="8MiB")
    penalized = SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=1.3, ignore_eos=True)
    engine = llm.engine
    for prompt in ([1, 2, 3], [4, 5, 6], [7, 8, 9]):
        engine.add_request(str(prompt), prompt, penalized)
    engine.step()
    state = engine.core.runner.sampler._penalties
    assert state is not None and state.num_requests == 3
    while engine.has_unfinished():
        engine.step()
    assert state.num_requests == 0  # let go by the step that finished them
    engine.add_request("aborted", [5, 6, 7], penalized)
    engine.step()
    engine.abort(["aborted"])
    assert state.num_requests == 1
    engine.step()  # an abort between steps: let go by the next one
    assert state.num_requests == 0
