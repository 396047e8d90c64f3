"""The fused temperature sampler (``sample/triton_sampling.py``): its draws follow
``softmax(logits / T)``, and the engine's sampler sends it only the rows it may take.

Runs through Triton's interpreter on the CPU, or compiled on a GPU with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from philox_reference import philox_uniforms
from race_recorder import record_race_calls
from triton_device import DEVICE  # before triton is imported: interpreted or compiled

from inferd.engine.request import Request
from inferd.sample import triton_sampling
from inferd.sample.sampler import Sampler
from inferd.sampling_params import SamplingParams


def test_draws_follow_the_tempered_softmax() -> None:
    """600 rows of the same 6 logits (the interpreter runs a program at a time): each token's
    count within 5 standard deviations of its expected count, across a block boundary (vocab 6 in
    blocks of 4). Ignoring the temperature would put token 3 11 deviations off."""
    rows, temperature = 600, 0.5
    row = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, 1.5])
    logits = row.repeat(rows, 1).to(DEVICE)
    old_block = triton_sampling._BLOCK
    triton_sampling._BLOCK = 4
    try:
        tokens = triton_sampling.race_sample(logits, torch.full((rows,), temperature, device=DEVICE), seed=11)
    finally:
        triton_sampling._BLOCK = old_block
    counts = torch.bincount(tokens.cpu(), minlength=6).double()
    expected = torch.softmax(row.double() / temperature, dim=0) * rows
    sigma = (expected * (1 - expected / rows)).sqrt()
    assert ((counts - expected).abs() <= 5 * sigma).all(), (counts, expected)


def test_each_row_uses_its_own_temperature_and_ids_stay_in_the_vocab() -> None:
    vocab = 37  # not a multiple of the block
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    cold = torch.tensor([1e-4, 1e-4, 1e-4, 50.0, 50.0, 50.0], device=DEVICE)
    draws = torch.stack([triton_sampling.race_sample(logits, cold, seed=s) for s in range(20)])
    assert (draws[:, :3] == logits[:3].argmax(dim=-1)).all()  # a tiny temperature is greedy
    assert len(set(draws[:, 3:].flatten().tolist())) > 10  # a huge one is near uniform
    assert draws.min() >= 0 and draws.max() < vocab


def test_seeds_repeat_and_differ() -> None:
    logits = torch.zeros(8, 50, device=DEVICE)
    temperatures = torch.ones(8, device=DEVICE)
    first = triton_sampling.race_sample(logits, temperatures, seed=5)
    assert torch.equal(first, triton_sampling.race_sample(logits, temperatures, seed=5))
    assert not torch.equal(first, triton_sampling.race_sample(logits, temperatures, seed=6))
    assert len(set(first.tolist())) > 1  # rows draw independent noise


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loop steps of 8 tokens, so a small vocabulary spans several steps and parts."""
    monkeypatch.setattr(triton_sampling, "_BLOCK", 8)


@pytest.mark.usefixtures("small_blocks")
def test_a_draw_does_not_depend_on_how_the_vocabulary_is_split() -> None:
    """Each token's noise comes from its row and id alone, and every part races exactly its own
    tokens: any split gives the tokens of the unsplit race, the last part short (37 tokens in
    steps of 8) and parts of several steps included. The logits sit far below 0, so every key
    is negative: a part the pick read past the row's last would win with a key of 0."""
    vocab = 37
    logits = (torch.randn(5, vocab, generator=torch.Generator().manual_seed(4)) - 1000).to(DEVICE)
    temperatures = torch.tensor([0.3, 1.0, 2.0, 5.0, 50.0], device=DEVICE)
    for seed in (1, 2, 3):
        whole = triton_sampling.race_sample(logits, temperatures, seed, num_chunks=1)
        for parts in (2, 3, 5, 64):
            assert torch.equal(triton_sampling.race_sample(logits, temperatures, seed, parts), whole), parts


@pytest.mark.usefixtures("small_blocks")
def test_every_token_of_every_part_can_win() -> None:
    """Near-uniform draws over 20 tokens in 3 parts of 8 (the last one 4): every id comes up,
    the first and last of each part included, and none outside the vocabulary."""
    vocab, rows = 20, 120
    logits = torch.zeros(rows, vocab, device=DEVICE)
    tokens = triton_sampling.race_sample(logits, torch.ones(rows, device=DEVICE), seed=7, num_chunks=3)
    assert set(tokens.tolist()) == set(range(vocab))


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize(("vocab", "parts"), [(37, 1), (37, 3), (1001, 4)])
def test_each_tokens_noise_comes_from_its_own_philox_counter(vocab: int, parts: int) -> None:
    """With flat logits the race picks the token of the largest draw, so the kernel's tokens must
    be a reference Philox's: token ``t`` of row ``r`` takes lane ``t % 4`` of counter
    ``r * ceil(vocab / 4) + t // 4``. Statistical tests would not see two rows sharing a counter
    or a lane sent to the wrong token; this does."""
    rows, seed = 6, 1234
    tokens = triton_sampling.race_sample(
        torch.zeros(rows, vocab, device=DEVICE), torch.ones(rows, device=DEVICE), seed, num_chunks=parts
    )
    quads = -(-vocab // 4)
    ids = np.arange(vocab)
    expected = []
    for row in range(rows):
        uniform = philox_uniforms(seed, row * quads + ids // 4)[ids, ids % 4]
        keys = np.float32(0.0) - np.log(-np.log(uniform))
        expected.append(int(np.argmax(keys)))
    assert tokens.tolist() == expected


def test_the_vocabulary_is_split_to_fill_the_multiprocessors(monkeypatch: pytest.MonkeyPatch) -> None:
    class Properties:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())
    gpu = torch.device("cuda")
    # 8 programs a multiprocessor: 1,056 over the rows, no part under one 1,024-token step.
    assert triton_sampling.default_num_chunks(1, 151_936, gpu) == 149
    assert triton_sampling.default_num_chunks(64, 151_936, gpu) == 17
    assert triton_sampling.default_num_chunks(256, 151_936, gpu) == 5
    assert triton_sampling.default_num_chunks(1056, 151_936, gpu) == 1
    assert triton_sampling.default_num_chunks(1, 500, gpu) == 1
    assert triton_sampling.default_num_chunks(1, 151_936, torch.device("cpu")) == 1


def test_rejects_mismatched_temperatures() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        triton_sampling.race_sample(torch.zeros(3, 5, device=DEVICE), torch.ones(2, device=DEVICE), seed=0)
    assert triton_sampling.race_sample(torch.zeros(0, 5), torch.ones(0), seed=0).shape == (0,)


def request(name: str, **params: object) -> Request:
    return Request(name, [1], SamplingParams(max_tokens=4, **params), frozenset(), 4)  # type: ignore[arg-type]


def test_sampler_sends_only_plain_temperature_rows(monkeypatch) -> None:
    """Greedy rows take the argmax, seeded and filtered rows the torch race; the rest go to the
    kernel in one call, with their own temperatures."""
    calls = record_race_calls(monkeypatch)
    sampler = Sampler(seed=3, triton_sampling=True, fused_min_rows=2)
    requests = [
        request("greedy", temperature=0.0),
        request("plain", temperature=0.5),
        request("seeded", temperature=0.8, seed=9),
        request("top_p", temperature=0.8, top_p=0.5),
        request("plain2", temperature=1.5),
    ]
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    tokens = sampler(logits, requests).token_ids
    assert [(call.rows, call.temperatures) for call in calls] == [(2, [0.5, 1.5])]
    assert tokens[0] == logits[0].argmax().item()
    assert all(0 <= t < 30 for t in tokens)
    # A second step draws anew: the counter moved on.
    sampler(logits, requests)
    assert len(calls) == 2


def test_steps_of_fewer_plain_rows_than_the_threshold_take_the_torch_race(monkeypatch) -> None:
    """Below ``fused_min_rows`` the kernel, slower there, is not called; the draws still follow
    each row's temperature (a cold row draws its argmax)."""
    calls = record_race_calls(monkeypatch)
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    sampler = Sampler(seed=5, triton_sampling=True, fused_min_rows=3)
    cold = [request(str(i), temperature=1e-4) for i in range(4)]
    assert sampler(logits[:2], cold[:2]).token_ids == logits[:2].argmax(dim=-1).tolist()
    assert calls == []
    assert sampler(logits[:3], cold[:3]).token_ids == logits[:3].argmax(dim=-1).tolist()
    assert [call.rows for call in calls] == [3]


def test_sampler_hands_the_kernel_the_models_half_precision_logits(monkeypatch) -> None:
    """No float32 copy of the logits is made for the kernel: it reads bfloat16 as it is and
    widens in registers, drawing the tokens it draws from the float32 copy."""
    calls = record_race_calls(monkeypatch)
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(DEVICE)
    requests = [request(str(i), temperature=0.8) for i in range(4)]
    from_half = Sampler(seed=2, triton_sampling=True, fused_min_rows=1)(logits, requests).token_ids
    from_float = Sampler(seed=2, triton_sampling=True, fused_min_rows=1)(logits.float(), requests).token_ids
    assert [call.dtype for call in calls] == [torch.bfloat16, torch.float32] and from_half == from_float


def test_sampler_draws_follow_the_softmax_through_the_kernel() -> None:
    sampler = Sampler(seed=1, triton_sampling=True)
    row = torch.tensor([0.0, 1.0, 2.0])
    rows = 600
    requests = [request(str(i), temperature=1.0) for i in range(rows)]
    tokens = torch.tensor(sampler(row.repeat(rows, 1).to(DEVICE), requests).token_ids)
    counts = torch.bincount(tokens, minlength=3).double()
    expected = torch.softmax(row.double(), dim=0) * rows
    assert ((counts - expected).abs() <= 5 * (expected * (1 - expected / rows)).sqrt()).all()
    assert math.isclose(counts.sum().item(), rows)


def test_the_inverse_cdf_kernel_draws_the_same_rows_when_asked_for(monkeypatch) -> None:
    """``fused_kernel="inverse_cdf"`` sends the rows the race would take to the other kernel, and
    none to the race; its draws follow the softmax too."""
    race = record_race_calls(monkeypatch)
    inverse_cdf = record_race_calls(monkeypatch, "inverse_cdf")
    sampler = Sampler(seed=3, triton_sampling=True, fused_min_rows=2, fused_kernel="inverse_cdf")
    requests = [request("greedy", temperature=0.0), request("plain", temperature=0.5),
                request("seeded", temperature=0.8, seed=9), request("plain2", temperature=1.5)]  # fmt: skip
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    tokens = sampler(logits, requests).token_ids
    assert race == [] and [(call.rows, call.temperatures) for call in inverse_cdf] == [(2, [0.5, 1.5])]
    assert tokens[0] == logits[0].argmax().item() and all(0 <= t < 30 for t in tokens)
    row, rows = torch.tensor([0.0, 1.0, 2.0]), 600
    many = [request(str(i), temperature=1.0) for i in range(rows)]
    drawn = torch.tensor(sampler(row.repeat(rows, 1).to(DEVICE), many).token_ids)
    counts = torch.bincount(drawn, minlength=3).double()
    expected = torch.softmax(row.double(), dim=0) * rows
    assert ((counts - expected).abs() <= 5 * (expected * (1 - expected / rows)).sqrt()).all()
    with pytest.raises(ValueError, match="unknown fused sampler 'gumbel'; choose one of race, inverse_cdf"):
        Sampler(triton_sampling=True, fused_kernel="gumbel")


def test_the_engine_option_picks_the_kernel(tiny_llama, monkeypatch) -> None:
    """``fused_sampler`` reaches the engine's sampler: a step of temperature-only rows goes to the
    inverse-CDF kernel; an unknown name is refused before anything loads."""
    from inferd import LLM, SamplingParams
    from inferd.engine.builder import build_engine_config
    from inferd.sample import sampler as sampler_module

    monkeypatch.setattr(sampler_module, "FUSED_MIN_ROWS", 1)
    calls = record_race_calls(monkeypatch, "inverse_cdf")
    llm = LLM(tiny_llama, device="cpu", triton_sampling=True, fused_sampler="inverse_cdf")
    params = SamplingParams(max_tokens=3, temperature=0.7, ignore_eos=True)
    outputs = llm.generate([[5, 6, 7], [8, 9]], params)
    assert [len(out.token_ids) for out in outputs] == [3, 3]
    assert [call.rows for call in calls] == [2, 2, 2]  # one call a step
    assert all(call.temperatures == pytest.approx([0.7, 0.7]) for call in calls)
    with pytest.raises(ValueError, match="unknown fused_sampler 'fast'; choose one of race, inverse_cdf"):
        build_engine_config(tiny_llama, fused_sampler="fast")


def test_a_batch_of_plain_rows_alone_takes_the_kernels_tokens_as_they_are(monkeypatch) -> None:
    """Every row temperature-only (the workload's full batches): the kernel reads the logits as
    they are and its tokens are the step's, with no index sent up and no scatter; a batch with one
    other row scatters the kernel's tokens into place."""
    from inferd.sample import triton_sampling as kernels

    made: list[torch.Tensor] = []
    original = kernels.race_sample

    def recorded(logits: torch.Tensor, temperatures: torch.Tensor, seed: int) -> torch.Tensor:
        made.append(original(logits, temperatures, seed))
        return made[-1]

    monkeypatch.setattr(kernels, "race_sample", recorded)
    sampler = Sampler(seed=4, triton_sampling=True, fused_min_rows=2)
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    plain = [request(str(i), temperature=0.7) for i in range(3)]
    assert sampler.sample(logits, plain).token_ids is made[-1]
    mixed = sampler.sample(logits, [*plain[:2], request("greedy", temperature=0.0)])
    assert mixed.token_ids is not made[-1] and torch.equal(mixed.token_ids[:2], made[-1])
    assert mixed.token_ids[2].item() == logits[2].argmax().item()
