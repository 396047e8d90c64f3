"""The penalties' Triton pass (``sample/triton_penalties.py``) against the count tables' torch
passes (``sample/penalty_tables.py``) and the host's histories, and an engine that uses it.

Runs through Triton's interpreter on the CPU, or compiled on a GPU with ``TRITON_INTERPRET=0``;
compared bit for bit either way (the kernel is compiled without fused multiply-adds).
"""

from __future__ import annotations

import random

import pytest
import torch
from triton_device import DEVICE, INTERPRETED  # before triton is imported: interpreted or compiled

from inferd import LLM
from inferd.engine.request import Request
from inferd.sample import triton_penalties
from inferd.sample.penalty_state import HostPenalties, PenaltyState
from inferd.sample.penalty_tables import PenaltyTables
from inferd.sample.sampler import Sampler
from inferd.sampling_params import SamplingParams


def _bits(logits: torch.Tensor) -> torch.Tensor:
    """The float32 logits' bits: -0 and +0 differ here, where they compare equal as floats."""
    return logits.view(torch.int32)


def _requests(rng: random.Random, vocab: int) -> list[Request]:
    penalties = [
        {},
        {"repetition_penalty": 1.3},
        {"repetition_penalty": 0.6},
        {"presence_penalty": 0.8},
        {"frequency_penalty": -0.7},
        {"repetition_penalty": 1.1, "presence_penalty": -0.4, "frequency_penalty": 1.5},
        {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.2},
        {"presence_penalty": -0.5, "frequency_penalty": -0.3},  # -0 * count + -0: a -0 to subtract
    ]
    requests = []
    for i, chosen in enumerate(penalties):
        # Tokens past the vocabulary (an added token the logits do not hold) are left out.
        prompt = [rng.randrange(vocab + 3) for _ in range(rng.randrange(1, 60))]
        request = Request(f"r{i}", prompt, SamplingParams(**chosen), frozenset(), 500)
        request.output_token_ids = [
            rng.choice([1, 2, rng.randrange(vocab + 3)]) for _ in range(rng.randrange(30))
        ]
        requests.append(request)
    return requests


@pytest.mark.parametrize("vocab", [50, 1024, 1500])  # below, at and across a block
def test_the_pass_matches_the_torch_passes_step_after_step(vocab: int) -> None:
    rng = random.Random(vocab)
    requests = _requests(rng, vocab)
    forms: dict[str, PenaltyState] = {
        "host": HostPenalties(),
        "tables": PenaltyTables(),
        "fused": PenaltyTables(fused=True),
    }
    for step in range(4):
        order = rng.sample(requests, len(requests))  # rows move between steps
        logits = torch.randn(len(order), vocab, generator=torch.Generator().manual_seed(step)) * 4
        logits[0, :5] = torch.tensor([float("-inf"), float("inf"), 0.0, -0.0, 1e-30])
        logits[:, 7] = -0.0  # a token no output holds keeps its sign, whatever the penalties
        drawn = [rng.choice([1, rng.randrange(vocab)]) for _ in order]
        made = {}
        for name, form in forms.items():
            processed = logits.to(DEVICE, copy=True)
            penalized = form.apply(processed, order)
            form.count_sampled(penalized, torch.tensor(drawn, device=DEVICE))
            made[name] = processed.cpu()
        assert torch.equal(_bits(made["tables"]), _bits(made["host"]))
        assert torch.equal(_bits(made["fused"]), _bits(made["tables"]))
        for request, token in zip(order, drawn, strict=True):
            request.output_token_ids.append(token)  # the token each form counted, read by the host now


def test_rows_not_penalized_are_left_alone() -> None:
    vocab, rng = 300, random.Random(1)
    penalized = _requests(rng, vocab)[1]
    plain = Request("plain", [1, 2, 3], SamplingParams(), frozenset(), 10)
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    processed = logits.clone()
    PenaltyTables(fused=True).apply(processed, [plain, penalized, plain])
    assert torch.equal(processed[0], logits[0]) and torch.equal(processed[2], logits[2])
    assert not torch.equal(processed[1], logits[1])


def test_the_pass_refuses_logits_it_cannot_write_in_place() -> None:
    counts = torch.zeros(1, 8, dtype=torch.int32, device=DEVICE)
    in_prompt = torch.zeros(1, 8, dtype=torch.bool, device=DEVICE)
    index = torch.zeros(1, dtype=torch.long, device=DEVICE)
    ones = torch.ones(1, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        triton_penalties.penalize(torch.zeros(1, 8, dtype=torch.bfloat16, device=DEVICE), index, index,
                                  counts, in_prompt, ones, ones, ones)  # fmt: skip


def test_the_sampler_takes_the_tables_when_asked_for_the_pass() -> None:
    sampler = Sampler(triton_penalties=True)
    request = Request("r", [4], SamplingParams(temperature=0, repetition_penalty=2.0), frozenset(), 10)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 3.0, 2.0]], device=DEVICE)
    assert sampler(logits, [request]).token_ids == [5]  # the prompt's 4 falls to 1.5
    state = sampler._penalties
    assert isinstance(state, PenaltyTables) and state._fused


@pytest.mark.skipif(not INTERPRETED, reason="the engine runs on the CPU here")
def test_an_engine_with_the_pass_gives_the_host_forms_outputs(tiny_model_factory) -> None:
    folder = tiny_model_factory("qwen3")
    prompts = [[5, 6, 7, 5, 6], [8, 9, 8], list(range(20, 40))]
    params = [
        SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=3.0, ignore_eos=True),
        SamplingParams(
            max_tokens=10,
            temperature=0.8,
            seed=2,
            presence_penalty=1.0,
            frequency_penalty=0.5,
            ignore_eos=True,
        ),  # fmt: skip
        SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
    ]
    options = {"device": "cpu", "kv_cache_memory": "8MiB", "async_scheduling": True}
    expected = [o.token_ids for o in LLM(folder, **options).generate(prompts, params)]
    llm = LLM(folder, triton_penalties=True, **options)
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    state = llm.engine.core.runner.sampler._penalties
    assert isinstance(state, PenaltyTables) and state._fused
