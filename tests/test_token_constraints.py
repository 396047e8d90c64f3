"""allowed_token_ids and bad_words (vLLM's): in the sampler, through every engine path, and served."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from server_process import run_server

from inferd import LLM, SamplingParams
from inferd.engine.async_llm import AsyncLLM
from inferd.engine.builder import default_model_path
from inferd.engine.request import Request
from inferd.sample.penalties import reads_history_on_host
from inferd.sample.sampler import Sampler
from inferd.sampling_params import SamplingParamsError


def _request(params: SamplingParams, output: list[int] | None = None) -> Request:
    request = Request("r", [0], params, frozenset(), 100)
    request.output_token_ids = list(output or [])
    return request


def test_the_sampler_draws_only_allowed_tokens() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.5, 3.0]])
    greedy = SamplingParams(temperature=0, allowed_token_ids=[1, 2])
    assert Sampler()(logits, [_request(greedy)]).token_ids == [1]
    sampled = SamplingParams(temperature=1.0, allowed_token_ids=[2, 3])
    draws = {Sampler(seed=seed)(logits, [_request(sampled)]).token_ids[0] for seed in range(40)}
    assert draws == {2, 3}


def test_the_sampler_bans_a_bad_words_last_token_after_the_rest_of_it() -> None:
    logits = torch.tensor([[1.0, 5.0, 4.0, 3.0]])
    one_token = SamplingParams(temperature=0, bad_words_token_ids=[[1]])
    assert Sampler()(logits, [_request(one_token)]).token_ids == [2]
    two_tokens = SamplingParams(temperature=0, bad_words_token_ids=[[3, 1], [0, 2, 1]])
    # Token 1 ends a bad word only after 3 (or after 0, 2): elsewhere it stays the choice.
    assert Sampler()(logits, [_request(two_tokens, output=[2])]).token_ids == [1]
    assert Sampler()(logits, [_request(two_tokens, output=[2, 3])]).token_ids == [2]
    assert Sampler()(logits, [_request(two_tokens, output=[0, 2])]).token_ids == [2]
    # Only a bad word of several tokens reads the output, so only it waits for the last token.
    assert reads_history_on_host(_request(two_tokens)) and not reads_history_on_host(_request(one_token))


def test_the_bans_are_laid_out_once_per_request() -> None:
    logits = torch.tensor([[1.0, 5.0, 4.0, 3.0]])
    request = _request(
        SamplingParams(temperature=0, allowed_token_ids=[1, 2, 3], bad_words_token_ids=[[3, 1]])
    )
    request.output_token_ids = [3]
    assert Sampler()(logits, [request]).token_ids == [2]
    bans = request.token_bans
    assert bans is not None and bans.after == {(3,): [1]}
    request.output_token_ids = [3, 2]
    assert Sampler()(logits, [request]).token_ids == [1] and request.token_bans is bans


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"bad_words": ["w"] * 1025}, "bad_words"),
        ({"bad_words_token_ids": [[5]] * 4097}, "bad_words_token_ids"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
        ({"bad_words": [" "]}, "bad_words"),
        ({"bad_words_token_ids": [[]]}, "bad_words_token_ids"),
    ],
)
def test_bad_constraints_name_their_field(kwargs: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(SamplingParamsError) as caught:
        SamplingParams(**kwargs)
    assert caught.value.field == field


# The built-in model: its greedy text does not repeat one token, as a tiny random model's does.
MODEL = default_model_path()
PLAIN = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
ENGINES = {
    "default": {},
    # Tokens come back one step late: a bad word of two tokens must still see the last one.
    "async": {"async_scheduling": True},
    # Guesses are verified by the same sampler; requests that read their output do not guess.
    "speculative": {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3}},
}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_constraints_hold_on_every_engine_path(engine: str) -> None:
    llm = LLM(MODEL, kv_cache_memory="8MiB", **ENGINES[engine])
    prompts = ["To be, or not", "ROMEO:"]
    plain = [out.token_ids for out in llm.generate(prompts, PLAIN)]
    for tokens in plain:
        banned = SamplingParams(
            max_tokens=12, temperature=0, ignore_eos=True, bad_words_token_ids=[[tokens[2]]]
        )
        (out,) = llm.generate(prompts[plain.index(tokens)], banned)
        assert out.token_ids[:2] == tokens[:2] and tokens[2] not in out.token_ids
        pair = [tokens[3], tokens[4]]
        paired = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, bad_words_token_ids=[pair])
        (out,) = llm.generate(prompts[plain.index(tokens)], paired)
        assert out.token_ids[:4] == tokens[:4] and out.token_ids[4] != tokens[4]
        assert all(out.token_ids[i : i + 2] != pair for i in range(len(out.token_ids) - 1))
        allowed = sorted(set(range(5, 40)) - set(tokens))
        only = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, allowed_token_ids=allowed)
        (out,) = llm.generate(prompts[plain.index(tokens)], only)
        assert set(out.token_ids) <= set(allowed)


def test_bad_words_are_banned_as_written_and_after_a_space() -> None:
    llm = LLM(MODEL, kv_cache_memory="8MiB")
    tokenizer = llm.engine.tokenizer
    (plain,) = llm.generate(["To be, or not"], PLAIN)
    word = next(w for w in plain.text.split() if len(tokenizer.encode(" " + w, add_special_tokens=False)) > 1)
    forms = [tokenizer.encode(text, add_special_tokens=False) for text in (word, " " + word)]
    (out,) = llm.generate(["To be, or not"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                            bad_words=[word]))  # fmt: skip
    ids = out.token_ids
    assert ids != plain.token_ids
    for form in forms:
        assert all(ids[i : i + len(form)] != form for i in range(len(ids)))


async def test_bad_words_reach_an_engine_process() -> None:
    """The input processor turns the words into token ids before the request crosses over."""
    local = LLM(MODEL, kv_cache_memory="8MiB")
    (plain,) = local.generate(["To be, or not"], PLAIN)
    word = plain.text.split()[1]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, bad_words=[word])
    (expected,) = local.generate(["To be, or not"], params)
    assert expected.token_ids != plain.token_ids
    llm = AsyncLLM.from_options(MODEL, engine_process=True, kv_cache_memory="8MiB")
    llm.start()
    try:
        outputs = [out async for out in llm.generate("r", "To be, or not", params)]
    finally:
        llm.shutdown()
    assert outputs[-1].token_ids == expected.token_ids


def test_served_constraints_and_their_errors() -> None:
    local = LLM(MODEL, kv_cache_memory="8MiB")
    (plain,) = local.generate(["To be, or not"], PLAIN)
    word = plain.text.split()[1]
    (expected,) = local.generate(
        ["To be, or not"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, bad_words=[word])
    )
    with run_server(MODEL, "--kv-cache-memory", "8MiB") as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        kwargs = {"model": server.model, "prompt": "To be, or not", "max_tokens": 12, "temperature": 0}
        reply = client.completions.create(**kwargs, extra_body={"ignore_eos": True, "bad_words": [word]})
        assert reply.choices[0].text == expected.text
        allowed = client.completions.create(**kwargs, logprobs=0, extra_body={"allowed_token_ids": [7, 9]})
        assert allowed.choices[0].logprobs is not None
        assert set(allowed.choices[0].logprobs.tokens or []) <= {
            local.engine.tokenizer.decode([t]) for t in (7, 9)
        }
        chat = client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            extra_body={"allowed_token_ids": [7]},
        )  # fmt: skip
        assert chat.choices[0].message.content == local.engine.tokenizer.decode([7] * 4)
        for body in ({"allowed_token_ids": [10**6]}, {"allowed_token_ids": []}, {"bad_words": [""]}):
            response = httpx.post(f"{server.base_url}/v1/completions", json={**kwargs, **body})
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == next(iter(body))


def test_the_server_tokenizes_bad_words_before_the_engine_thread_sees_them() -> None:
    from prometheus_client import CollectorRegistry

    from inferd.server.errors import InvalidRequestError
    from inferd.server.frontend import Frontend
    from inferd.server.metrics import ServerMetrics

    llm = AsyncLLM.from_options(MODEL, kv_cache_memory="8MiB")
    frontend = Frontend(llm, "m", ServerMetrics(CollectorRegistry(), "m", llm.stats))
    params = frontend.sampling_params(max_tokens=4, bad_words=["thee"])
    tokenizer = llm.tokenizer
    forms = [tokenizer.encode(text, add_special_tokens=False) for text in ("thee", " thee")]
    assert params.bad_words == [] and params.bad_words_token_ids == forms
    with pytest.raises(InvalidRequestError) as caught:
        frontend.sampling_params(max_tokens=4, bad_words=["w"] * 1025)
    assert caught.value.field == "bad_words"
