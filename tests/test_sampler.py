from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from inferd.engine.request import Request, RequestFault
from inferd.sample.sampler import Sampler, TokenLogprobs
from inferd.sampling_params import SamplingParams, SamplingParamsError


def _req(params: SamplingParams, out: list[int] | None = None, prompt: list[int] | None = None) -> Request:
    r = Request("r", prompt or [0], params, frozenset({0}), 100)
    r.output_token_ids = list(out or [])
    return r


def _logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_greedy_picks_argmax() -> None:
    result = Sampler()(_logits([0.0, 3.0, 1.0]), [_req(SamplingParams(temperature=0))])
    assert result.token_ids == [1]


@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 9e-6])
def test_a_tiny_positive_temperature_is_greedy(temperature: float) -> None:
    # Dividing by it would overflow float32 logits to inf, and their softmax to NaN.
    logits = _logits([0.0, 3.0, 1.0], [-2.0, 4.0, 5.0])
    reqs = [_req(SamplingParams(temperature=temperature)) for _ in range(2)]
    assert Sampler()(logits, reqs).token_ids == [1, 2]


def test_seeds_of_the_whole_64_bit_range_draw() -> None:
    logits = torch.randn(3, 50)
    reqs = [_req(SamplingParams(seed=s)) for s in (2**64 - 1, -(2**63), 0)]
    assert len(Sampler()(logits, reqs).token_ids) == 3


def test_top_k_one_is_greedy_even_at_high_temperature() -> None:
    reqs = [_req(SamplingParams(temperature=5.0, top_k=1)) for _ in range(20)]
    logits = _logits(*[[0.0, 1.0, 0.5, 0.9]] * 20)
    assert Sampler()(logits, reqs).token_ids == [1] * 20


def test_top_p_keeps_smallest_set_reaching_mass() -> None:
    # probs ~ [0.6, 0.3, 0.1]: top_p=0.5 keeps only the first token.
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]] * 200))
    tokens = Sampler()(logits, [_req(SamplingParams(top_p=0.5)) for _ in range(200)]).token_ids
    assert set(tokens) == {0}
    tokens = Sampler()(logits, [_req(SamplingParams(top_p=0.85)) for _ in range(200)]).token_ids
    assert set(tokens) == {0, 1}


def test_min_p_drops_unlikely_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.45, 0.05]] * 200))
    tokens = Sampler()(logits, [_req(SamplingParams(min_p=0.2)) for _ in range(200)]).token_ids
    assert set(tokens) == {0, 1}


def test_seed_makes_draws_independent_of_batch() -> None:
    logits = torch.randn(1, 50)
    alone = Sampler()(logits, [_req(SamplingParams(seed=7))]).token_ids
    busy_logits = torch.cat([torch.randn(5, 50), logits, torch.randn(3, 50)])
    reqs = [_req(SamplingParams()) for _ in range(5)] + [_req(SamplingParams(seed=7))]
    reqs += [_req(SamplingParams(seed=i)) for i in range(3)]
    busy = Sampler(seed=123)(busy_logits, reqs).token_ids
    assert busy[5] == alone[0]


class _OpCounts(TorchFunctionMode):
    """Counts the torch functions and tensor methods called inside the block, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", str(func))
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_all_random_rows_are_drawn_without_a_gather_or_a_greedy_pass() -> None:
    """With no greedy row, the logits go to the draw as they are: no argmax for greedy rows and
    no gather of the random rows (each a pass over the logits; the gather took 250 ms on a
    2-core CPU at 64 rows of a 151,936-token vocabulary). A mixed batch does both. Either way one
    pass finds each row's peak for the finiteness check: the greedy pass where there is one."""
    logits = torch.randn(4, 50)
    random = [_req(SamplingParams(temperature=0.8)) for _ in range(4)]
    with _OpCounts() as ops:
        tokens = Sampler(seed=3)(logits, random).token_ids
    assert ops.counts.get("index_select", 0) == 0 and ops.counts["argmax"] == 1  # the draw's own
    assert ops.counts["amax"] == 1 and "max" not in ops.counts
    mixed = [_req(SamplingParams(temperature=0))] + random[1:]
    with _OpCounts() as ops:
        mixed_tokens = Sampler(seed=3)(logits, mixed).token_ids
    assert ops.counts["index_select"] == 1 and ops.counts["argmax"] == 1 and ops.counts["max"] == 1
    assert "amax" not in ops.counts
    assert mixed_tokens[0] == int(logits[0].argmax()) and all(0 <= t < 50 for t in tokens)


def test_half_precision_logits_sample_as_their_float32_widening() -> None:
    """The sampler widens the model's logits only where it computes with them, and widening is
    exact: every path (greedy, the race with and without filters, a seed, penalties, logprobs)
    gives from bfloat16 logits what it gives from their float32 copy, and an all-greedy step
    widens nothing (the pass over the logits that is saved)."""

    def requests() -> list[Request]:
        return [
            _req(SamplingParams(temperature=0)),
            _req(SamplingParams(temperature=0.7)),
            _req(SamplingParams(temperature=1.0, top_p=0.8, top_k=10)),
            _req(SamplingParams(temperature=1.3, min_p=0.1)),
            _req(SamplingParams(temperature=0.9, seed=11)),
            _req(SamplingParams(temperature=0, presence_penalty=1.5), out=[3, 5]),
            _req(SamplingParams(temperature=0.5, logprobs=3)),
        ]

    half = torch.randn(7, 40, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    from_half, from_float = Sampler(seed=4)(half, requests()), Sampler(seed=4)(half.float(), requests())
    assert from_half.token_ids == from_float.token_ids
    assert from_half.logprobs == from_float.logprobs and from_half.logprobs[-1] is not None
    # Processors work on a float32 copy: in bfloat16, 100.5 - 0.25 rounds to 100.0 and ties token 0.
    close = torch.tensor([[100.0, 100.5]], dtype=torch.bfloat16)
    penalized = _req(SamplingParams(temperature=0, presence_penalty=0.25), out=[1])
    assert Sampler()(close, [penalized]).token_ids == [1]
    greedy = [_req(SamplingParams(temperature=0)) for _ in range(7)]
    with _OpCounts() as ops:
        tokens = Sampler()(half, greedy).token_ids
    assert tokens == half.float().argmax(dim=-1).tolist()
    assert not {"float", "to", "type"} & set(ops.counts), ops.counts


def test_the_engine_samples_from_logits_in_the_models_dtype(tiny_model_factory, monkeypatch) -> None:
    """A bfloat16 model's logits reach the sampler as bfloat16: no float32 copy of the step's
    [rows, vocab] logits on the way."""
    from inferd import LLM

    seen: list[torch.dtype] = []
    original = Sampler.sample

    def recorded(self: Sampler, logits: torch.Tensor, requests: list[Request]) -> object:
        seen.append(logits.dtype)
        return original(self, logits, requests)

    monkeypatch.setattr(Sampler, "sample", recorded)
    llm = LLM(tiny_model_factory("llama"), kv_cache_memory="4MiB", dtype="bfloat16")
    (out,) = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 3 and seen == [torch.bfloat16] * 3


def test_penalties_change_the_choice() -> None:
    logits = _logits([0.0, 2.0, 1.9])
    assert Sampler()(logits, [_req(SamplingParams(temperature=0), out=[1])]).token_ids == [1]
    for params in (
        SamplingParams(temperature=0, presence_penalty=0.5),
        SamplingParams(temperature=0, frequency_penalty=0.5),
        SamplingParams(temperature=0, repetition_penalty=1.2),
    ):
        assert Sampler()(logits, [_req(params, out=[1])]).token_ids == [2]


def test_logit_bias_and_min_tokens() -> None:
    logits = _logits([5.0, 1.0, 0.0])
    biased = SamplingParams(temperature=0, logit_bias={2: 10.0})
    assert Sampler()(logits, [_req(biased)]).token_ids == [2]
    # Token 0 is EOS: blocked until min_tokens are out.
    assert Sampler()(logits, [_req(SamplingParams(temperature=0, min_tokens=2), out=[1])]).token_ids == [1]
    assert Sampler()(logits, [_req(SamplingParams(temperature=0, min_tokens=1), out=[1])]).token_ids == [0]


def test_logprobs_of_chosen_and_top_n() -> None:
    logits = _logits([0.0, 2.0, 1.0])
    result = Sampler()(logits, [_req(SamplingParams(temperature=0, logprobs=2))])
    lp = result.logprobs[0]
    assert lp is not None
    expected = torch.log_softmax(logits[0], -1)
    assert lp.token_id == 1 and lp.logprob == pytest.approx(expected[1].item())
    assert [t for t, _ in lp.top] == [1, 2] and lp.rank == 1
    assert Sampler()(logits, [_req(SamplingParams())]).logprobs == [None]
    # A token below the top: its rank counts the tokens at least as likely, itself among them.
    forced = Sampler()(logits, [_req(SamplingParams(temperature=0, logprobs=0, allowed_token_ids=[0]))])
    assert forced.token_ids == [0] and forced.logprobs[0] is not None and forced.logprobs[0].rank == 3
    tied = Sampler()(_logits([1.0, 1.0, 0.0]), [_req(SamplingParams(temperature=0, logprobs=0))])
    assert tied.logprobs[0] is not None and tied.logprobs[0].rank == 2


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"min_p": 2}, "min_p"),
        ({"typical_p": 0}, "typical_p"),
        ({"typical_p": 1.5}, "typical_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logprobs": 50}, "logprobs"),
        ({"stop": [""]}, "stop"),
        # Each token is searched for every stop: their number and length are bounded.
        ({"stop": [f"s{i}" for i in range(65)]}, "stop"),
        ({"stop": ["x" * 9000, "y" * 9000]}, "stop"),
        ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        # Counts and ids are whole numbers (True is an int to Python, not a count).
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"seed": True}, "seed"),
        ({"logprobs": True}, "logprobs"),
        ({"stop": [1]}, "stop"),
        ({"stop_token_ids": [1.0]}, "stop_token_ids"),
        ({"logit_bias": {"five": 1.0}}, "logit_bias"),
        ({"logit_bias": {5: "much"}}, "logit_bias"),
    ],
)
def test_invalid_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field


def test_vllms_optional_fields_take_none_and_logit_bias_takes_json_keys() -> None:
    params = SamplingParams(stop=None, stop_token_ids=None, bad_words=None, logit_bias=None)  # type: ignore[arg-type]
    assert (params.stop, params.stop_token_ids, params.bad_words, params.logit_bias) == ([], [], [], {})
    # numpy's numbers, as a script drawing seeds from numpy passes them: kept as Python's.
    import numpy as np

    drawn = SamplingParams(
        seed=np.int64(3), max_tokens=np.int64(8), logit_bias={np.int64(5): np.float32(1.0)}
    )
    assert (type(drawn.seed), drawn.max_tokens, drawn.logit_bias) == (int, 8, {5: 1.0})
    for key in ("²", "--5", "٣"):  # digits as Python's int() reads more than JSON writes
        with pytest.raises(SamplingParamsError, match="logit_bias: keys must be token ids"):
            SamplingParams(logit_bias={key: 1.0})
    # An OpenAI body's object keys are strings: read as the token ids they name.
    assert SamplingParams(logit_bias={"5": 100, 7: -1.5}).logit_bias == {5: 100.0, 7: -1.5}  # type: ignore[dict-item]


def test_typical_p_keeps_the_tokens_transformers_keeps() -> None:
    """Locally typical sampling after the temperature, top-k, top-p and min-p, as transformers'
    warpers run in that order: each row keeps exactly the tokens its TypicalLogitsWarper leaves
    finite, min-p's unnormalized rows and rows without typical_p among them."""
    import transformers.generation.logits_process as hf

    settings = [dict(typical_p=0.2), dict(typical_p=0.9, temperature=0.5), dict(typical_p=0.5, top_k=20),
                dict(typical_p=0.7, top_p=0.8), dict(typical_p=0.6, min_p=0.05), dict(typical_p=0.999),
                dict(top_p=0.9), dict()]  # fmt: skip
    logits = torch.randn(len(settings), 200, generator=torch.Generator().manual_seed(3)) * 3
    requests = [_req(SamplingParams(**{"temperature": 1.0, **values})) for values in settings]  # type: ignore[arg-type]
    kept = Sampler._filtered_probs(logits, requests) > 0
    for row, values in enumerate(settings):
        scores = logits[row : row + 1] / values.get("temperature", 1.0)
        warpers = [hf.TopKLogitsWarper(values["top_k"])] if "top_k" in values else []
        warpers += [hf.TopPLogitsWarper(values["top_p"])] if "top_p" in values else []
        warpers += [hf.MinPLogitsWarper(values["min_p"])] if "min_p" in values else []
        warpers += [hf.TypicalLogitsWarper(values["typical_p"])] if "typical_p" in values else []
        for warper in warpers:
            scores = warper(None, scores)
        assert torch.equal(kept[row], torch.isfinite(scores[0])), values
    assert 0 < kept[0].sum() < kept[-1].sum() == 200  # a narrow mass keeps few, none keeps all
    # A row with typical_p is not one the fused kernel may draw: it needs the filter.
    from inferd.sample.sampler import _temperature_only

    assert not _temperature_only(requests[0], 200) and _temperature_only(requests[-1], 200)


def test_prompt_logprobs_rank_the_top_tokens_by_place_even_when_tied() -> None:
    """vLLM's shape: the prompt's token first; where it is among the top ones, its place there is
    its rank, so two tied top tokens still rank 1 and 2 (its own count would make both 2)."""
    from inferd.server.openai.token_logprobs import prompt_logprobs

    class Names:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return f"<{ids[0]}>"

    tied = TokenLogprobs(1, -0.69, ((1, -0.69), (2, -0.69)), rank=2)  # two tokens at least as likely
    below = TokenLogprobs(7, -3.0, ((1, -0.5), (2, -0.9)), rank=5)
    entries = prompt_logprobs(Names(), [None, tied, below], 2, as_ids=False)  # type: ignore[arg-type]
    assert entries[0] is None and entries[1] is not None and entries[2] is not None
    assert [(k, v.rank) for k, v in entries[1].items()] == [("1", 1), ("2", 2)]
    assert [(k, v.rank, v.decoded_token) for k, v in entries[2].items()] == [
        ("7", 5, "<7>"), ("1", 1, "<1>"), ("2", 2, "<2>"),
    ]  # fmt: skip
    named = prompt_logprobs(Names(), [below], 1, as_ids=True)[0]  # type: ignore[arg-type]
    assert named is not None and [v.decoded_token for v in named.values()] == ["token_id:7", "token_id:1"]


@pytest.mark.parametrize("temperatures", [(0, 0, 0, 0), (0.8, 0.8, 0.8, 0.8), (0, 0.8, 0, 0.8)],
                         ids=["greedy", "random", "mixed"])  # fmt: skip
@pytest.mark.parametrize("processed", [False, True], ids=["raw", "penalized"])
def test_rows_without_finite_logits_fail_alone(temperatures: tuple[float, ...], processed: bool) -> None:
    """A NaN or +inf logit (a fault of the model's numerics) and a row whose every token is
    excluded leave nothing to draw from: argmax and the race would still name some token. Those
    rows end with an error; the others draw what they draw without them."""
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    broken = logits.clone()
    broken[1, 7] = float("nan")
    broken[2, 3] = float("inf")
    allowed = [4, 5]

    def requests() -> list[Request]:
        found = []
        for row, temperature in enumerate(temperatures):
            extra: dict = {"presence_penalty": 0.5} if processed else {}
            if row == 3:  # its limits together exclude every token
                extra.update(allowed_token_ids=allowed, bad_words_token_ids=[[4], [5]])
            found.append(_req(SamplingParams(temperature=temperature, seed=row, **extra), out=[2]))
        return found

    result = Sampler(seed=5)(broken, requests())
    assert set(result.errors) == {1, 2, 3}
    assert "not finite (the largest is nan)" in result.errors[1]
    assert "not finite (the largest is inf)" in result.errors[2]
    assert "exclude every token" in result.errors[3]
    # The request's own limits are its fault (a 400 at the servers); the model's numerics are not.
    assert [isinstance(result.errors[row], RequestFault) for row in (1, 2, 3)] == [False, False, True]
    clean = Sampler(seed=5)(logits, requests())
    assert result.token_ids[0] == clean.token_ids[0] and 1 not in clean.errors


def test_a_logit_a_requests_own_penalty_makes_infinite_is_no_fault_of_the_model() -> None:
    """A repetition penalty of 5e-324 divides a logit by it (+inf): the request's doing, not the
    model's numerics (a schema fuzzer's request got a 500 for it)."""
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, repetition_penalty=5e-324, seed=1)
        assert Sampler()(logits, [_req(params, out=[1])]).errors == {}


def test_a_request_whose_logits_go_nan_ends_with_an_error_and_the_batch_goes_on(
    tiny_model_factory, monkeypatch
) -> None:
    from inferd import LLM

    original = Sampler.sample

    def poisoned(self: Sampler, logits: torch.Tensor, requests: list[Request]) -> object:
        rows = [i for i, r in enumerate(requests) if r.prompt_token_ids[0] == 9 and r.output_token_ids[1:]]
        if rows:
            logits = logits.clone()
            logits[rows, 0] = float("nan")
        return original(self, logits, requests)

    llm = LLM(tiny_model_factory("llama"), kv_cache_memory="4MiB")
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = llm.generate([[1, 2, 3], [4, 5]], params)
    monkeypatch.setattr(Sampler, "sample", poisoned)
    outs = llm.generate([[1, 2, 3], [9, 9, 9], [4, 5]], params, raise_on_error=False)
    assert [o.token_ids for o in (outs[0], outs[2])] == [e.token_ids for e in expected]
    assert outs[1].finish_reason == "error" and "not finite" in (outs[1].error or "")
    assert len(outs[1].token_ids) == 2  # the tokens before the fault stand
