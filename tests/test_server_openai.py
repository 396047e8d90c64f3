"""The OpenAI-compatible API of a real `inferd serve`, driven by the official `openai` SDK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from server_process import ServerProcess, run_server

# In the tiny tokenizer "é" is split over two tokens: 322 ends with its first byte, 106 is its second.
# This bias plus frequency penalty makes greedy decoding alternate them: "fé" "fé" ...
SPLIT_CHAR_BIAS = {"322": 100, "106": 99}


@pytest.fixture(scope="module")
def server(tiny_llama) -> Iterator[ServerProcess]:
    # A second name the model answers to (vLLM's several served names); answers give the first.
    args = ("--kv-cache-memory", "8MiB", "--served-model-name", "tiny", "tiny-alias")
    with run_server(tiny_llama, *args) as process:
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def async_client(server: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_name(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "tiny-alias"]
    assert client.models.retrieve("tiny") == models[0] and client.models.retrieve("tiny-alias") == models[1]
    answer = client.completions.create(model="tiny-alias", prompt="To be", max_tokens=2)
    assert answer.model == "tiny"  # the first name, as vLLM answers
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("other")
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_version_and_sagemakers_ping(server: ServerProcess) -> None:
    from inferd.version import package_version

    assert httpx.get(f"{server.base_url}/version").json() == {"version": package_version()}
    assert httpx.get(f"{server.base_url}/ping").status_code == 200
    assert httpx.post(f"{server.base_url}/ping").status_code == 200


def test_sagemaker_invocations_take_each_kind_of_body(server: ServerProcess) -> None:
    """`POST /invocations` (SageMaker's one route, as vLLM and TGI serve it) goes where its body's
    fields say; a body of no known kind is a 400 in OpenAI's shape."""
    url = f"{server.base_url}/invocations"
    base = {"max_tokens": 2, "temperature": 0}
    chat = httpx.post(url, json={**base, "messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] == 2
    completion = httpx.post(url, json={**base, "prompt": "To be"}).json()
    assert completion["object"] == "text_completion"
    # A null field is an absent one, as every route reads it (this went to chat: a 400).
    unset_chat = httpx.post(url, json={**base, "messages": None, "prompt": "To be"}).json()
    assert unset_chat["object"] == "text_completion"
    direct = httpx.post(f"{server.base_url}/v1/completions", json={**base, "prompt": "To be"}).json()
    assert completion["choices"][0]["text"] == direct["choices"][0]["text"]
    tgi = httpx.post(url, json={"inputs": "To be", "parameters": {"max_new_tokens": 2}}).json()
    assert isinstance(tgi, list) and "generated_text" in tgi[0]
    embedded = httpx.post(url, json={"model": "tiny", "input": "To be"}).json()
    assert embedded["object"] == "list" and len(embedded["data"][0]["embedding"]) > 0
    with httpx.stream("POST", url, json={**base, "prompt": "To be", "stream": True}) as streamed:
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert [line for line in streamed.iter_lines() if line][-1] == "data: [DONE]"
    for body in ({"model": "tiny"}, [1, 2], "not json", "[" * 100_000):  # the last nested too deep
        refused = httpx.post(url, content=body if isinstance(body, str) else None,
                             json=None if isinstance(body, str) else body)  # fmt: skip
        assert (
            refused.status_code == 400
            and "messages, prompt, inputs, input" in refused.json()["error"]["message"]
        )


def test_completion_reports_usage_and_length(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model="tiny", prompt="To be, or", max_tokens=6, extra_body={"ignore_eos": True}
    )
    assert result.object == "text_completion"
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None
    assert result.usage.completion_tokens == 6
    assert result.usage.total_tokens == result.usage.prompt_tokens + 6


def test_completion_accepts_token_ids_and_prompt_lists(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model="tiny", prompt=["To be", "Café"], max_tokens=3, n=2, temperature=0
    )
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    # Greedy: both samples of one prompt agree.
    assert result.choices[0].text == result.choices[1].text
    by_ids = client.completions.create(model="tiny", prompt=[[302, 322]], max_tokens=3, temperature=0)
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == 2


def test_echo_prepends_the_prompt(client: openai.OpenAI) -> None:
    result = client.completions.create(model="tiny", prompt="To be", max_tokens=3, echo=True, temperature=0)
    assert result.choices[0].text.startswith("To be")


def test_echo_with_logprobs_scores_the_prompt_as_well(client: openai.OpenAI) -> None:
    """How a text is scored (lm-eval's loglikelihood requests): the prompt's tokens lead, the first
    without a log-probability; streamed and not alike."""
    prompt = [302, 322, 106, 57, 91]
    kwargs = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": 2,
        "temperature": 0,
        "echo": True,
        "logprobs": 2,
    }
    whole = client.completions.create(**kwargs).choices[0].logprobs  # type: ignore[call-overload]
    assert whole is not None and len(whole.tokens) == len(prompt) + 2
    assert whole.token_logprobs[0] is None and whole.top_logprobs[0] is None
    assert all(lp is not None and lp <= 0 for lp in whole.token_logprobs[1:])
    assert whole.text_offset == sorted(whole.text_offset) and whole.text_offset[0] == 0
    chunks = list(client.completions.create(stream=True, **kwargs))  # type: ignore[call-overload]
    streamed = [
        lp for chunk in chunks for c in chunk.choices if c.logprobs for lp in c.logprobs.token_logprobs
    ]
    assert streamed == whole.token_logprobs
    # A one-token prompt: one entry, null. A prompt of multi-byte characters: the answer's tokens
    # start where the echoed text ends.
    single = client.completions.create(**{**kwargs, "prompt": [302]}).choices[0]  # type: ignore[call-overload]
    assert single.logprobs is not None and single.logprobs.token_logprobs[0] is None
    cafe = client.completions.create(**{**kwargs, "prompt": "Café 東京"}).choices[0]  # type: ignore[call-overload]
    assert cafe.logprobs is not None and cafe.logprobs.text_offset[-2] == len("Café 東京")


def test_same_seed_streamed_and_not_give_the_same_text(client: openai.OpenAI) -> None:
    kwargs = {"model": "tiny", "prompt": "Whether 'tis", "max_tokens": 24, "temperature": 1.0, "seed": 7}
    whole = client.completions.create(**kwargs).choices[0].text
    pieces = [
        chunk.choices[0].text for chunk in client.completions.create(stream=True, **kwargs) if chunk.choices
    ]
    assert "".join(pieces) == whole
    again = client.completions.create(**kwargs).choices[0].text
    assert again == whole


def test_n_samples_use_consecutive_seeds(client: openai.OpenAI) -> None:
    kwargs = {"model": "tiny", "prompt": "The quick", "max_tokens": 12, "temperature": 1.0}
    pair = client.completions.create(n=2, seed=11, **kwargs)
    second_alone = client.completions.create(seed=12, **kwargs)
    assert pair.choices[1].text == second_alone.choices[0].text
    assert pair.choices[0].text != pair.choices[1].text


def test_best_of_returns_the_likeliest_n_of_its_candidates(client: openai.OpenAI) -> None:
    """best_of candidates per prompt (seeded seed, seed + 1, ... as n samples are), of which the n
    whose tokens have the highest mean log-probability come back, likeliest first; every
    candidate's tokens count in the usage; no logprobs unless asked."""
    kwargs = {"model": "tiny", "max_tokens": 10, "temperature": 1.5}
    prompts = ["The quick", "To be"]
    response = client.completions.create(prompt=prompts, n=2, best_of=4, seed=5, **kwargs)
    expected, total_tokens = [], 0
    for prompt in prompts:
        candidates = []
        for sample in range(4):
            alone = client.completions.create(prompt=prompt, seed=5 + sample, logprobs=0, **kwargs)
            logprobs = alone.choices[0].logprobs
            assert logprobs is not None and logprobs.token_logprobs is not None and alone.usage is not None
            mean = sum(logprobs.token_logprobs) / len(logprobs.token_logprobs)
            candidates.append((mean, alone.choices[0].text))
            total_tokens += alone.usage.completion_tokens
        assert len({text for _, text in candidates}) > 2  # the candidates differ: the choice matters
        expected.extend(text for _, text in sorted(candidates, reverse=True)[:2])
    assert [choice.index for choice in response.choices] == [0, 1, 2, 3]
    assert [choice.text for choice in response.choices] == expected
    assert all(choice.logprobs is None for choice in response.choices)
    assert response.usage is not None and response.usage.completion_tokens == total_tokens


def test_best_of_below_n_or_streamed_is_400(client: openai.OpenAI) -> None:
    for extra in ({"n": 3, "best_of": 2}, {"best_of": 2, "stream": True}, {"best_of": 129}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=1.0, **extra)
        assert caught.value.body["param"] == "best_of"  # type: ignore[index]


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    ids = list(range(5, 45))
    kwargs = {"model": "tiny", "max_tokens": 5, "temperature": 0}
    kept = client.completions.create(prompt=ids, extra_body={"truncate_prompt_tokens": 3}, **kwargs)
    assert kept.usage is not None and kept.usage.prompt_tokens == 3
    assert kept.choices[0].text == client.completions.create(prompt=ids[-3:], **kwargs).choices[0].text
    # -1: as much of the end as leaves room for the output in the 512-token context.
    too_long = list(range(5, 300)) * 2
    with pytest.raises(openai.BadRequestError):
        client.completions.create(prompt=too_long, **kwargs)
    fitted = client.completions.create(prompt=too_long, extra_body={"truncate_prompt_tokens": -1}, **kwargs)
    assert fitted.usage is not None and fitted.usage.prompt_tokens == 512 - 5
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "To be, or not"}], max_tokens=2,
        extra_body={"truncate_prompt_tokens": 2},
    )  # fmt: skip
    assert chat.usage is not None and chat.usage.prompt_tokens == 2
    # A text longer than any context could hold is refused untokenized, unless it is truncated:
    # then its end is tokenized (with the tokenizer's special tokens or without).
    huge = "To be, or not to be. " * 100_000
    with pytest.raises(openai.BadRequestError, match="more tokens than this model's context"):
        client.completions.create(prompt=huge, **kwargs)
    for special in (True, False):
        cut = client.completions.create(
            prompt=huge, extra_body={"truncate_prompt_tokens": 4, "add_special_tokens": special}, **kwargs
        )
        assert cut.usage is not None and cut.usage.prompt_tokens == 4
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(prompt="hi", extra_body={"truncate_prompt_tokens": 0}, **kwargs)
    assert caught.value.body["param"] == "truncate_prompt_tokens"  # type: ignore[index]


def test_seeds_outside_64_bits_are_400_and_fan_out_wraps(client: openai.OpenAI) -> None:
    kwargs = {"model": "tiny", "prompt": "The quick", "max_tokens": 6, "temperature": 1.0}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(seed=2**64, **kwargs)
    assert caught.value.body["param"] == "seed"  # type: ignore[index]
    # The second sample's seed, 2**64, wraps to 0 instead of failing the engine step.
    pair = client.completions.create(n=2, seed=2**64 - 1, **kwargs)
    assert pair.choices[1].text == client.completions.create(seed=0, **kwargs).choices[0].text


def test_streamed_chunks_never_split_a_multibyte_character(client: openai.OpenAI) -> None:
    kwargs = {
        "model": "tiny",
        "prompt": "Caf",
        "max_tokens": 10,
        "temperature": 0,
        "logit_bias": SPLIT_CHAR_BIAS,
        "frequency_penalty": 2.0,
    }
    whole = client.completions.create(**kwargs).choices[0].text
    assert "é" in whole and "\ufffd" not in whole
    chunks = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert "".join(chunks) == whole
    assert all("\ufffd" not in chunk for chunk in chunks)
    # Each "é" needs two tokens, so some chunks must have held a byte back to the next step.
    assert len([c for c in chunks if c]) < 10


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI) -> None:
    kwargs = {"model": "tiny", "prompt": "To be", "max_tokens": 30, "temperature": 1.0, "seed": 3}
    free = client.completions.create(**kwargs).choices[0].text
    stop = free[10:13]
    stopped = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free[: free.index(stop)]
    streamed = list(client.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == stopped.text
    # vLLM's stop_reason: the stop string matched, with the whole answer and the last chunk.
    assert stopped.model_extra is not None and stopped.model_extra["stop_reason"] == stop
    assert [c.choices[0].model_extra["stop_reason"] for c in streamed if c.choices][-1] == stop
    free_end = client.completions.create(**kwargs).choices[0]
    assert free_end.finish_reason == "length" and free_end.model_extra["stop_reason"] is None  # type: ignore[index]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 30,
            "temperature": 1.0, "seed": 3}  # fmt: skip
    tokens = client.chat.completions.create(**chat, extra_body={"return_token_ids": True}).choices[0]
    stop_id = tokens.model_extra["token_ids"][2]  # type: ignore[index]
    ended = client.chat.completions.create(**chat, extra_body={"stop_token_ids": [stop_id]}).choices[0]
    assert ended.finish_reason == "stop" and ended.model_extra["stop_reason"] == stop_id  # type: ignore[index]
    chunks = list(
        client.chat.completions.create(**chat, stream=True, extra_body={"stop_token_ids": [stop_id]})
    )
    assert [c.choices[0].model_extra["stop_reason"] for c in chunks if c.choices][-1] == stop_id


def test_completion_logprobs(client: openai.OpenAI) -> None:
    result = client.completions.create(model="tiny", prompt="To be", max_tokens=5, logprobs=3, temperature=0)
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.top_logprobs is not None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs or []) == 5
    assert all(len(top) <= 3 for top in logprobs.top_logprobs)
    # Greedy picks the most likely token, so it heads its own top list.
    assert logprobs.token_logprobs == pytest.approx([max(top.values()) for top in logprobs.top_logprobs])


def test_completion_logprobs_go_to_20_as_vllm_takes_them(client: openai.OpenAI) -> None:
    result = client.completions.create(model="tiny", prompt="To be", max_tokens=2, logprobs=12)
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.top_logprobs is not None
    # Keyed by their text, as OpenAI writes them: tokens that decode alike share a key.
    assert max(len(top) for top in logprobs.top_logprobs) > 5 and all(
        len(top) <= 13 for top in logprobs.top_logprobs
    )
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="To be", max_tokens=2, logprobs=21)
    assert caught.value.body["param"] == "logprobs"  # type: ignore[index]


def test_completion_top_logprobs_always_hold_the_sampled_token(client: openai.OpenAI) -> None:
    # At a high temperature most sampled tokens are outside the top one.
    result = client.completions.create(
        model="tiny", prompt="To be", max_tokens=12, logprobs=1, temperature=2.0, seed=3
    )
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.top_logprobs and logprobs.token_logprobs
    for token, logprob, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert token in top
        if "\ufffd" not in token:  # pieces of characters may share their text with another token
            assert top[token] == pytest.approx(logprob)
        assert len(top) <= 2
    assert any(len(top) == 2 for top in logprobs.top_logprobs)


def test_chat_completion_and_its_stream(client: openai.OpenAI) -> None:
    kwargs = {
        "model": "tiny",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café?"}],
        "max_completion_tokens": 8,
        "temperature": 1.0,
        "seed": 5,
    }
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage is not None and whole.usage.completion_tokens <= 8
    chunks = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    # The same counts (the second run's prompt came from the prefix cache, which only its details say).
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert [getattr(chunks[-1].usage, n) for n in counts] == [getattr(whole.usage, n) for n in counts]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_chat_logprob_bytes_join_into_characters_split_over_tokens(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Caf"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=1,
        logit_bias=SPLIT_CHAR_BIAS,  # type: ignore[arg-type]
        frequency_penalty=2.0,
    )
    choice = result.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    joined = b"".join(bytes(entry.bytes or []) for entry in choice.logprobs.content)
    assert "é" in choice.message.content and joined.decode() == choice.message.content  # type: ignore[operator]


def test_chat_logprobs_and_n(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        n=2,
        logprobs=True,
        top_logprobs=2,
        seed=1,
    )
    assert len(result.choices) == 2
    for choice in result.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert len(choice.logprobs.content) == 4
        assert all(len(entry.top_logprobs) == 2 for entry in choice.logprobs.content)


async def test_async_client_streams_and_not_concurrently(async_client: openai.AsyncOpenAI) -> None:
    async def streamed(seed: int) -> str:
        stream = await async_client.completions.create(
            model="tiny", prompt="Or to take", max_tokens=10, seed=seed, stream=True
        )
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    async def whole(seed: int) -> str:
        result = await async_client.completions.create(
            model="tiny", prompt="Or to take", max_tokens=10, seed=seed
        )
        return result.choices[0].text

    seeds = range(4)
    streamed_texts = await asyncio.gather(*(streamed(s) for s in seeds))
    whole_texts = await asyncio.gather(*(whole(s) for s in seeds))
    assert streamed_texts == whole_texts
    chat = await async_client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=3
    )
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_unknown_routes_answer_in_the_openai_error_shape(server: ServerProcess) -> None:
    response = httpx.get(f"{server.base_url}/v1/no-such-route")
    assert response.status_code == 404 and "Not Found" in response.json()["error"]["message"]
    wrong_method = httpx.get(f"{server.base_url}/v1/completions")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"
    # SageMaker's route is middleware, so no route redirects its slashed form as /tokenize/ is.
    slashed = httpx.post(f"{server.base_url}/invocations/", json={"prompt": "hi"})
    assert slashed.status_code == 404 and "Not Found" in slashed.json()["error"]["message"]


def test_bad_field_is_400_naming_it(client: openai.OpenAI) -> None:
    for field, value in (("temperature", 7.0), ("n", 0), ("top_p", 0.0)):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="tiny", prompt="hi", max_tokens=2, **{field: value})
        assert caught.value.body["param"] == field  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="hi", logit_bias={"99999": 1})
    assert caught.value.body["param"] == "logit_bias"  # type: ignore[index]


def test_cache_salt_keeps_cached_prefixes_apart(client: openai.OpenAI, server: ServerProcess) -> None:
    """vLLM's `cache_salt`: a prompt cached under one salt is a miss under another (and unsalted)."""
    prompt = list(range(200, 264))  # whole blocks of any block size up to 32

    def hits(**extra: object) -> float:
        before = server.metrics()["inferd:prefix_cache_hits_total"]
        client.completions.create(model="tiny", prompt=prompt, max_tokens=1, extra_body=extra)
        return server.metrics()["inferd:prefix_cache_hits_total"] - before

    assert hits(cache_salt="tenant-a") == 0
    assert hits(cache_salt="tenant-b") == 0 and hits() == 0
    assert hits(cache_salt="tenant-a") > 0
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], extra_body={"cache_salt": ""}
        )
    assert caught.value.body["param"] == "cache_salt"  # type: ignore[index]


def test_usage_counts_the_prompt_tokens_the_prefix_cache_served(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    """OpenAI's `prompt_tokens_details.cached_tokens`, whole and streamed, for completions and chat."""
    prompt = list(range(300, 364))
    options: dict[str, Any] = {"model": "tiny", "max_tokens": 2, "extra_body": {"cache_salt": "usage-test"}}
    streamed = {"stream": True, "stream_options": {"include_usage": True}}

    def cached(answer: Any) -> int:
        usage = (
            [chunk.usage for chunk in answer if chunk.usage][0]
            if isinstance(answer, openai.Stream)
            else answer.usage
        )
        assert usage is not None and usage.prompt_tokens_details is not None
        return usage.prompt_tokens_details.cached_tokens or 0

    def hits_and_cached(**extra: Any) -> tuple[float, int]:
        before = server.metrics()["inferd:prefix_cache_hits_total"]
        count = cached(client.completions.create(prompt=prompt, **options, **extra))
        return server.metrics()["inferd:prefix_cache_hits_total"] - before, count

    assert hits_and_cached() == (0, 0)
    hits, count = hits_and_cached()
    assert hits == count > 0
    assert hits_and_cached(**streamed) == (count, count)
    messages = [{"role": "user", "content": "Say something about the prefix cache, if you please."}]
    first, second = (cached(client.chat.completions.create(messages=messages, **options)) for _ in range(2))
    assert first == 0 and second > 0
    assert cached(client.chat.completions.create(messages=messages, **options, **streamed)) == second


def _extra(body: Any, name: str) -> Any:
    """A field the OpenAI SDK's types do not declare (vLLM's), as the server sent it."""
    return (body.model_extra or {}).get(name)


def test_return_token_ids_gives_the_prompts_and_the_answers_tokens(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    """vLLM's `return_token_ids`: whole and streamed (each chunk the tokens since the last, the
    prompt's with a choice's first chunk), for completions and chat; nothing without it."""
    greedy: dict[str, Any] = {"model": "tiny", "max_tokens": 8, "temperature": 0}
    asked = {"extra_body": {"return_token_ids": True}}
    prompts = ["To be, or not", "Tomorrow, and"]
    whole = client.completions.create(prompt=prompts, n=2, **greedy, **asked)
    for choice in whole.choices:
        prompt = prompts[choice.index // 2]
        tokens = httpx.post(f"{server.base_url}/tokenize", json={"prompt": prompt}).json()["tokens"]
        assert _extra(choice, "prompt_token_ids") == tokens
        ids = _extra(choice, "token_ids")
        assert (
            httpx.post(f"{server.base_url}/detokenize", json={"tokens": ids}).json()["prompt"] == choice.text
        )
    assert sum(len(_extra(c, "token_ids")) for c in whole.choices) == whole.usage.completion_tokens  # type: ignore[union-attr]
    plain = client.completions.create(prompt=prompts[0], **greedy)
    assert (
        _extra(plain.choices[0], "token_ids") is None and _extra(plain.choices[0], "prompt_token_ids") is None
    )
    chunks = list(client.completions.create(prompt=prompts[0], stream=True, **greedy, **asked))
    assert _extra(chunks[0].choices[0], "prompt_token_ids") == _extra(whole.choices[0], "prompt_token_ids")
    assert all(_extra(c.choices[0], "prompt_token_ids") is None for c in chunks[1:])
    streamed = [token for c in chunks for token in _extra(c.choices[0], "token_ids")]
    assert streamed == _extra(whole.choices[0], "token_ids")

    messages = [{"role": "user", "content": "To be, or not"}]
    chat = client.chat.completions.create(messages=messages, **greedy, **asked)
    rendered = httpx.post(f"{server.base_url}/tokenize", json={"messages": messages}).json()["tokens"]
    assert _extra(chat, "prompt_token_ids") == rendered
    chat_ids = _extra(chat.choices[0], "token_ids")
    assert len(chat_ids) == chat.usage.completion_tokens  # type: ignore[union-attr]
    chat_chunks = list(client.chat.completions.create(messages=messages, stream=True, **greedy, **asked))
    assert _extra(chat_chunks[0], "prompt_token_ids") == rendered
    assert [t for c in chat_chunks for t in (_extra(c.choices[0], "token_ids") or [])] == chat_ids
    assert _extra(client.chat.completions.create(messages=messages, **greedy), "prompt_token_ids") is None


def test_prompt_logprobs_in_vllms_shape(client: openai.OpenAI, server: ServerProcess) -> None:
    """vLLM's `prompt_logprobs`: per prompt token (None for the first) the prompt's own token with
    its rank, then the likeliest ones ranked 1..k; the same scores as an echoed prompt's logprobs;
    on a completion's every choice and a chat answer's top level; refused on a stream unless 0."""
    prompt = [302, 322, 106, 57, 91, 12]
    greedy: dict[str, Any] = {"model": "tiny", "max_tokens": 2, "temperature": 0}
    answer = client.completions.create(prompt=prompt, n=2, **greedy, extra_body={"prompt_logprobs": 2})
    for choice in answer.choices:
        scored = _extra(choice, "prompt_logprobs")
        assert len(scored) == len(prompt) and scored[0] is None
        for token, entry in zip(prompt[1:], scored[1:], strict=True):
            own, ranks = entry[str(token)], sorted(e["rank"] for e in entry.values())
            assert list(entry)[0] == str(token) and own["logprob"] <= 0
            # The prompt's token among the two likeliest, or a third entry ranked below them.
            assert ranks == [1, 2] if len(entry) == 2 else (ranks[:2] == [1, 2] and own["rank"] >= 3)
            by_rank = sorted(entry.values(), key=lambda e: e["rank"])
            assert [e["logprob"] for e in by_rank] == sorted((e["logprob"] for e in by_rank), reverse=True)
            decoded = httpx.post(f"{server.base_url}/detokenize", json={"tokens": [token]}).json()["prompt"]
            assert own["decoded_token"] == decoded
    echoed = client.completions.create(prompt=prompt, echo=True, logprobs=1, **greedy).choices[0].logprobs
    assert echoed is not None and echoed.top_logprobs is not None
    scores = [entry[str(token)]["logprob"] for token, entry in zip(prompt[1:], scored[1:], strict=True)]
    assert scores == pytest.approx(echoed.token_logprobs[1 : len(prompt)], abs=1e-5)
    # With echo and fewer logprobs than prompt_logprobs, each keeps its own count.
    both = client.completions.create(
        prompt=prompt, echo=True, logprobs=1, **greedy, extra_body={"prompt_logprobs": 4}
    ).choices[0]
    assert both.logprobs is not None and both.logprobs.top_logprobs is not None
    assert all(len(top) <= 2 for top in both.logprobs.top_logprobs if top is not None)
    for token, entry in zip(prompt[1:], _extra(both, "prompt_logprobs")[1:], strict=True):
        assert len(entry) == 4 + (entry[str(token)]["rank"] > 4)
    assert _extra(client.completions.create(prompt=prompt, **greedy).choices[0], "prompt_logprobs") is None

    messages = [{"role": "user", "content": "To be, or not"}]
    chat = client.chat.completions.create(
        messages=messages, **greedy, extra_body={"prompt_logprobs": 0, "return_token_ids": True}
    )
    rendered, chat_scored = _extra(chat, "prompt_token_ids"), _extra(chat, "prompt_logprobs")
    assert len(chat_scored) == len(rendered) and chat_scored[0] is None
    assert [list(entry) for entry in chat_scored[1:]] == [[str(token)] for token in rendered[1:]]

    streamed = list(
        client.completions.create(prompt=prompt, stream=True, **greedy, extra_body={"prompt_logprobs": 0})
    )
    assert all(_extra(c.choices[0], "prompt_logprobs") is None for c in streamed if c.choices)
    for body in ({"prompt_logprobs": 1, "stream": True}, {"prompt_logprobs": -1}, {"prompt_logprobs": 21}):
        refused = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "Hi", **greedy, **body})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt_logprobs", body
    beam = {"messages": messages, **greedy, "use_beam_search": True, "prompt_logprobs": 1}
    refused = httpx.post(f"{server.base_url}/v1/chat/completions", json=beam)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt_logprobs"


def test_a_prompts_choices_share_one_scoring_of_it(client: openai.OpenAI, server: ServerProcess) -> None:
    """Scoring a prompt bypasses the prefix cache; with n = 2 only the first sample scores it and
    both choices carry its scores, so the second sample looks its prompt up in the cache like any
    other request (the queries count its tokens)."""
    prompt = [302, 322, 106, 57, 91, 12, 40]
    greedy: dict[str, Any] = {"model": "tiny", "max_tokens": 2, "temperature": 0}
    queries = "inferd:prefix_cache_queries_total"
    before = server.metrics()
    answer = client.completions.create(prompt=prompt, n=2, **greedy, extra_body={"prompt_logprobs": 1})
    first, second = (_extra(choice, "prompt_logprobs") for choice in answer.choices)
    assert first == second and first is not None and len(first) == len(prompt)
    messages = [{"role": "user", "content": "To be"}]
    chat = client.chat.completions.create(
        messages=messages, n=2, **greedy, extra_body={"prompt_logprobs": 0, "return_token_ids": True}
    )
    rendered = _extra(chat, "prompt_token_ids")
    assert len(_extra(chat, "prompt_logprobs")) == len(rendered)
    after = server.metrics()
    assert after[queries] - before.get(queries, 0.0) == len(prompt) + len(rendered)


def test_echoed_choices_share_one_scoring_of_their_prompt(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    """`echo` with `logprobs` and n = 3: every choice leads with its prompt's scores, computed by its
    first sample alone (each sample scored it before, bypassing the prefix cache: 0 queries), whole
    and streamed, the other choices' chunks waiting for them where they come first."""
    prompt = [302, 322, 106, 57, 91, 12, 40, 77]
    kwargs: dict[str, Any] = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 1}
    alone = client.completions.create(**kwargs, temperature=0).choices[0].logprobs
    assert alone is not None
    prompt_scores = alone.token_logprobs[: len(prompt)]
    queries = "inferd:prefix_cache_queries_total"
    before = server.metrics()
    whole = client.completions.create(**kwargs, n=3, temperature=1.0, seed=3)
    streamed: dict[int, list[float | None]] = {}
    for chunk in client.completions.create(**kwargs, n=3, temperature=1.0, seed=3, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed.setdefault(choice.index, []).extend(choice.logprobs.token_logprobs)
    after = server.metrics()
    for choice in whole.choices:
        assert choice.logprobs is not None and len(choice.logprobs.token_logprobs) == len(prompt) + 3
        assert choice.logprobs.token_logprobs[: len(prompt)] == pytest.approx(prompt_scores, abs=1e-5)
        assert streamed[choice.index] == choice.logprobs.token_logprobs
    # Two requests, two samples each that did not score their prompt.
    assert after[queries] - before.get(queries, 0.0) == 2 * 2 * len(prompt)


def test_return_tokens_as_token_ids_names_logprobs_tokens_by_id(client: openai.OpenAI) -> None:
    """vLLM's `return_tokens_as_token_ids`: "token_id:N" wherever logprobs name a token; the text,
    its offsets and a chat token's bytes stay the text's."""
    greedy: dict[str, Any] = {
        "model": "tiny",
        "max_tokens": 4,
        "temperature": 0,
        "logit_bias": SPLIT_CHAR_BIAS,
    }
    kwargs = {**greedy, "prompt": "Caf", "logprobs": 2, "echo": True}
    plain = client.completions.create(**kwargs).choices[0]  # type: ignore[call-overload]
    named = client.completions.create(  # type: ignore[call-overload]
        **kwargs, extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True}
    ).choices[0]
    assert named.text == plain.text and named.logprobs is not None and plain.logprobs is not None
    prompt_ids, ids = _extra(named, "prompt_token_ids"), _extra(named, "token_ids")
    assert named.logprobs.tokens == [f"token_id:{t}" for t in [*prompt_ids, *ids]]
    assert named.logprobs.text_offset == plain.logprobs.text_offset
    assert named.logprobs.token_logprobs == plain.logprobs.token_logprobs
    assert named.logprobs.top_logprobs is not None and plain.logprobs.top_logprobs is not None
    for by_id, by_text in zip(named.logprobs.top_logprobs[1:], plain.logprobs.top_logprobs[1:], strict=True):
        assert by_id is not None and by_text is not None
        assert all(key.startswith("token_id:") for key in by_id) and len(by_id) >= len(by_text)

    messages = [{"role": "user", "content": "Caf"}]
    chat_kwargs = {**greedy, "messages": messages, "logprobs": True, "top_logprobs": 1}
    as_text = client.chat.completions.create(**chat_kwargs).choices[0].logprobs  # type: ignore[call-overload]
    as_ids = client.chat.completions.create(  # type: ignore[call-overload]
        **chat_kwargs, extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True}
    ).choices[0]
    assert as_text is not None and as_ids.logprobs is not None
    content, expected = as_ids.logprobs.content, as_text.content
    assert content is not None and expected is not None
    assert [entry.token for entry in content] == [f"token_id:{t}" for t in _extra(as_ids, "token_ids")]
    assert [entry.bytes for entry in content] == [entry.bytes for entry in expected]
    assert all(top.token.startswith("token_id:") for entry in content for top in entry.top_logprobs)


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(client: openai.OpenAI) -> None:
    """vLLM's stream_options.continuous_usage_stats (with include_usage): each chunk's usage counts
    the tokens generated so far, rising to the final usage chunk's."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    greedy: dict[str, Any] = {"model": "tiny", "max_tokens": 30, "temperature": 0, "stream": True}
    greedy["extra_body"] = {"ignore_eos": True}
    for chunks in (
        list(client.completions.create(prompt="To be", stream_options=options, **greedy)),  # type: ignore[arg-type]
        list(
            client.chat.completions.create(
                messages=[{"role": "user", "content": "To be"}], stream_options=options, **greedy
            )
        ),  # type: ignore[arg-type]
    ):
        with_choices = [chunk for chunk in chunks if chunk.choices]
        assert with_choices and all(chunk.usage is not None for chunk in with_choices)
        counts = [chunk.usage.completion_tokens for chunk in with_choices if chunk.usage]
        assert counts == sorted(counts)
        final = chunks[-1].usage
        assert final is not None and counts[-1] == final.completion_tokens
        assert {chunk.usage.prompt_tokens for chunk in with_choices if chunk.usage} == {final.prompt_tokens}
    plain = list(client.completions.create(prompt="To be", stream_options={"include_usage": True}, **greedy))  # type: ignore[arg-type]
    assert all(chunk.usage is None for chunk in plain[:-1])
    # vLLM's include_usage is on unless said otherwise: continuous_usage_stats alone asks for both.
    alone = list(
        client.completions.create(prompt="To be", stream_options={"continuous_usage_stats": True}, **greedy)
    )  # type: ignore[arg-type]
    assert all(chunk.usage is not None for chunk in alone) and not alone[-1].choices
    off = {"continuous_usage_stats": True, "include_usage": False}
    assert all(
        chunk.usage is None
        for chunk in client.completions.create(prompt="To be", stream_options=off, **greedy)
    )  # type: ignore[arg-type]
    assert all(
        chunk.usage is None
        for chunk in client.completions.create(prompt="To be", stream_options={}, **greedy)
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [("logits_processors", ["my.module:Processor"]), ("guided_whitespace_pattern", "[\\n ]+"),
     ("structural_tag", "{}"), ("vllm_xargs", {"a": 1}),
     ("kv_transfer_params", {}), ("mm_processor_kwargs", {}), ("prompt_embeds", "AAAA")],
)  # fmt: skip
def test_vllm_fields_that_are_not_served_are_refused(server: ServerProcess, field: str, value: Any) -> None:
    """Each would change the answer: a 400 naming it, never an answer without it (chat too, but
    for prompt_embeds, a completion's field)."""
    routes = [("completions", {"prompt": "To be"})]
    if field != "prompt_embeds":
        routes.append(("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}))
    for route, body in routes:
        response = httpx.post(f"{server.base_url}/v1/{route}", json={"model": "tiny", **body, field: value})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == field


def test_a_structured_output_backend_name_is_taken(server: ServerProcess) -> None:
    """vLLM's guided_decoding_backend picks a library, not the answer: llguidance serves it."""
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 8, "guided_choice": ["yes", "no"],
            "guided_decoding_backend": "xgrammar"}  # fmt: skip
    answer = httpx.post(f"{server.base_url}/v1/completions", json=body)
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] in ("yes", "no")


def test_chat_refuses_what_only_completions_or_tools_serve(server: ServerProcess) -> None:
    """A tool_choice without tools (OpenAI and vLLM refuse it) and best_of above n (served on
    completions only); best_of equal to n is the plain request."""
    url = f"{server.base_url}/v1/chat/completions"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    refusals = (({"tool_choice": "auto"}, "tool_choice"), ({"tool_choice": "required"}, "tool_choice"),
                ({"best_of": 3}, "best_of"))  # fmt: skip
    for extra, param in refusals:
        response = httpx.post(url, json={**body, **extra})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    for extra in ({"tool_choice": "none"}, {"best_of": 1}, {"tool_choice": "auto", "tools": []}):
        assert httpx.post(url, json={**body, **extra}).status_code == 200


def test_completion_logprobs_zero_still_names_the_sampled_token(client: openai.OpenAI) -> None:
    result = client.completions.create(model="tiny", prompt="To be", max_tokens=5, logprobs=0, temperature=0)
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.top_logprobs and logprobs.token_logprobs
    assert logprobs.top_logprobs == [
        {token: lp} for token, lp in zip(logprobs.tokens, logprobs.token_logprobs, strict=True)
    ]


def test_tokenize_renders_a_conversation_as_the_chat_route_does(server: ServerProcess) -> None:
    """continue_final_message, chat_template_kwargs and documents as chat reads them, and the
    same refusals (a template of the request's own, a continuation with a generation prompt)."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    fields = {"messages": messages, "continue_final_message": True, "add_generation_prompt": False}
    tokens = httpx.post(f"{server.base_url}/tokenize", json={"model": "tiny", **fields}).json()["tokens"]
    chat = httpx.post(
        f"{server.base_url}/v1/chat/completions", json={"model": "tiny", "max_tokens": 1, **fields}
    )
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == len(tokens)
    whole = httpx.post(f"{server.base_url}/tokenize", json={"model": "tiny", "messages": messages}).json()
    assert whole["count"] > len(tokens)  # the continued turn is left open
    for refused, param in (({**fields, "chat_template": "{{ 'X' }}"}, "chat_template"),
                           ({**fields, "add_generation_prompt": True}, "continue_final_message"),
                           ({"messages": messages, "chat_template_kwargs": {"add_generation_prompt": True}},
                            "chat_template_kwargs")):  # fmt: skip
        response = httpx.post(f"{server.base_url}/tokenize", json={"model": "tiny", **refused})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_pooling_routes_take_priority_and_refuse_what_they_do_not_serve(server: ServerProcess) -> None:
    """Under first-come-first-served scheduling a priority is refused on every route (it was
    dropped on the pooling ones); embeddings are L2-normalized, so normalize false is refused, and
    /pooling gives its outputs whole (no dimensions)."""
    url = server.base_url
    for route, body in (("/v1/embeddings", {"input": "To be"}), ("/pooling", {"input": "To be"}),
                        ("/v1/score", {"text_1": "a", "text_2": "b"}),
                        ("/v1/rerank", {"query": "a", "documents": ["b"]})):  # fmt: skip
        response = httpx.post(url + route, json={"model": "tiny", **body, "priority": 1})
        assert response.status_code == 400 and response.json()["error"]["param"] == "priority", response.text
        assert httpx.post(url + route, json={"model": "tiny", **body, "priority": 0}).status_code == 200
    for route in ("/v1/embeddings", "/pooling"):
        refused = httpx.post(url + route, json={"model": "tiny", "input": "To be", "normalize": False})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "normalize"
        assert (
            httpx.post(url + route, json={"model": "tiny", "input": "To be", "normalize": True}).status_code
            == 200
        )
    cut = httpx.post(url + "/pooling", json={"model": "tiny", "input": "To be", "dimensions": 8})
    assert cut.status_code == 400 and cut.json()["error"]["param"] == "dimensions"


def test_null_fields_take_their_defaults(server: ServerProcess) -> None:
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "presence_penalty": None,
             "frequency_penalty": None, "seed": None, "stop": None, "stream_options": None}  # fmt: skip
    prompt = {"model": "tiny", "prompt": "To be", "ignore_eos": True}
    completion = httpx.post(
        f"{server.base_url}/v1/completions", json={**prompt, **nulls, "echo": None, "max_tokens": None}
    )
    assert completion.status_code == 200, completion.text
    usage = completion.json()["usage"]  # max_tokens null: the rest of the 512-token context
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 512
    chat_body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi", "name": None}],
        "max_tokens": 3,
    }
    chat = httpx.post(f"{server.base_url}/v1/chat/completions", json={**chat_body, **nulls, "logprobs": None})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["logprobs"] is None


def test_stream_options_need_stream(server: ServerProcess) -> None:
    for route, body in (
        ("completions", {"prompt": "To be"}),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ):
        for stream in ({}, {"stream": False}):
            response = httpx.post(
                f"{server.base_url}/v1/{route}",
                json={
                    "model": "tiny",
                    "max_tokens": 2,
                    "stream_options": {"include_usage": True},
                    **body,
                    **stream,
                },
            )
            assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"


def test_chat_template_extras_as_vllm_takes_them(server: ServerProcess) -> None:
    """add_generation_prompt, continue_final_message and chat_template_kwargs (vLLM's names)."""
    url = f"{server.base_url}/v1/chat/completions"
    greedy = {"model": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    hello = [{"role": "user", "content": "hi"}]

    def prompt_tokens(**fields: object) -> int:
        answer = httpx.post(url, json={**greedy, "messages": hello, **fields})
        assert answer.status_code == 200, answer.text
        return int(answer.json()["usage"]["prompt_tokens"])

    # Without the generation prompt the template leaves out its one "<|assistant|>" token.
    assert prompt_tokens(add_generation_prompt=False) == prompt_tokens() - 1
    # Continuing the assistant's message: the prompt ends with its text, as a completion of it would.
    opened = [*hello, {"role": "assistant", "content": "To be"}]
    body = {**greedy, "messages": opened, "add_generation_prompt": False, "continue_final_message": True}
    continued = httpx.post(url, json=body).json()
    completion = httpx.post(
        f"{server.base_url}/v1/completions", json={**greedy, "prompt": "<|user|>hi\n<|assistant|>To be"}
    ).json()
    assert continued["usage"]["prompt_tokens"] == completion["usage"]["prompt_tokens"]
    assert continued["choices"][0]["message"]["content"] == completion["choices"][0]["text"]
    refused = (
        ({"messages": opened, "continue_final_message": True}, "continue_final_message"),
        ({"messages": hello, "add_generation_prompt": False, "continue_final_message": True},
         "continue_final_message"),
        ({"messages": hello, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    )  # fmt: skip
    for fields, param in refused:
        answer = httpx.post(url, json={**greedy, **fields})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text


def test_context_overflow_is_400_with_both_numbers(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="To be", max_tokens=600)
    message = caught.value.body["message"]  # type: ignore[index]
    assert "512" in message and "602" in message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "be " * 600}])
    assert "512" in caught.value.body["message"]  # type: ignore[index]
    assert caught.value.body["param"] == "messages"  # type: ignore[index]


def test_malformed_json_gets_the_openai_error_shape(server: ServerProcess) -> None:
    response = httpx.post(
        f"{server.base_url}/v1/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert "not valid JSON" in response.json()["error"]["message"]
    missing = httpx.post(f"{server.base_url}/v1/chat/completions", json={"model": "tiny"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"


def test_tokenize_and_detokenize(server: ServerProcess, tiny_llama) -> None:
    tokens = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "Café"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
    text = httpx.post(f"{server.base_url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text == {"prompt": "Café"}
    chat = httpx.post(
        f"{server.base_url}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}
    ).json()
    assert chat["count"] > 1
    bad = httpx.post(f"{server.base_url}/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    # vLLM's return_token_strs: each token's vocabulary entry.
    from tokenizers import Tokenizer

    asked = {"prompt": "Café", "return_token_strs": True}
    with_strs = httpx.post(f"{server.base_url}/tokenize", json=asked).json()
    assert with_strs["tokens"] == tokens["tokens"] and tokens["token_strs"] is None
    tokenizer = Tokenizer.from_file(f"{tiny_llama}/tokenizer.json")
    assert with_strs["token_strs"] == [tokenizer.id_to_token(t) for t in tokens["tokens"]]


def test_every_request_is_logged(client: openai.OpenAI, server: ServerProcess) -> None:
    result = client.completions.create(model="tiny", prompt="To be", max_tokens=2, n=2)
    for index in range(2):
        line = server.wait_for_log(f"request {result.id}-{index} finished: ")
        assert "prompt 2 tokens" in line and "ttft" in line and "total" in line


def test_a_chat_template_that_writes_the_bos_gets_no_second_one(tiny_llama, tmp_path) -> None:
    """Llama 3's and Gemma's templates begin with the BOS token, which their tokenizers also add
    to text: a chat prompt, and /tokenize of its messages, carry it once (vLLM tokenizes chats so)."""
    import json
    import shutil

    import httpx
    from tokenizers import Tokenizer, processors

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = "<|eos|>"  # the tiny tokenizer's BOS token
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ bos_token }}" + config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "user", "content": "To be"}]
    with run_server(folder, "--kv-cache-memory", "8MiB", "--served-model-name", "tiny") as server:
        tokens = httpx.post(f"{server.base_url}/tokenize", json={"messages": messages}).json()["tokens"]
        chat = httpx.post(f"{server.base_url}/v1/chat/completions",
                          json={"messages": messages, "max_tokens": 1}).json()  # fmt: skip
        text = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "To be"}).json()["tokens"]
        # vLLM's add_special_tokens: completions and embeddings add them unless told not to, chat
        # only when told to (its template writes its own).
        completions = [
            httpx.post(f"{server.base_url}/v1/completions",
                       json={"prompt": "To be", "max_tokens": 1, "return_token_ids": True, **extra}).json()
            for extra in ({}, {"add_special_tokens": False})
        ]  # fmt: skip
        with_bos_too = {"messages": messages, "max_tokens": 1, "add_special_tokens": True}
        doubled = httpx.post(f"{server.base_url}/v1/chat/completions", json=with_bos_too).json()
        embedded = [
            httpx.post(f"{server.base_url}/v1/embeddings", json={"input": "To be", **extra}).json()["usage"]
            for extra in ({}, {"add_special_tokens": False})
        ]
    bos_id = tokenizer.token_to_id(bos)
    assert tokens[0] == bos_id and tokens[1] != bos_id
    assert chat["usage"]["prompt_tokens"] == len(tokens)
    assert text[0] == bos_id  # plain text still gets the tokenizer's BOS
    with_bos, without = (c["choices"][0]["prompt_token_ids"] for c in completions)
    assert with_bos == text and without == text[1:]
    assert doubled["usage"]["prompt_tokens"] == len(tokens) + 1
    assert [u["prompt_tokens"] for u in embedded] == [len(text), len(text) - 1]


def test_the_clients_request_id_names_the_answer(server: ServerProcess) -> None:
    """vLLM's X-Request-Id (which wins) or body request_id: the answer's id is made from it and the
    header comes back, on every route; two requests with one id run apart (the engine's ids stay
    the server's own); a malformed header is ignored."""
    url = server.base_url
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    answer = httpx.post(f"{url}/v1/chat/completions", json=chat, headers={"X-Request-Id": "trace-1"})
    assert answer.json()["id"] == "chatcmpl-trace-1" and answer.headers["x-request-id"] == "trace-1"
    by_body = httpx.post(
        f"{url}/v1/completions", json={"model": "tiny", "prompt": "To be", "request_id": "mine"}
    )
    assert by_body.json()["id"] == "cmpl-mine" and "x-request-id" not in by_body.headers
    named = {"model": "tiny", "prompt": "To be", "request_id": "body"}
    both = httpx.post(f"{url}/v1/completions", json=named, headers={"X-Request-Id": "head"})
    assert both.json()["id"] == "cmpl-head"
    streamed = {**chat, "stream": True}
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=streamed, headers={"X-Request-Id": "s"}
    ) as live:
        ids = {json.loads(line[6:])["id"] for line in live.iter_lines() if line.startswith("data: {")}
        assert live.headers["x-request-id"] == "s"
    assert ids == {"chatcmpl-s"}
    tgi = httpx.post(f"{url}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}},
                     headers={"X-Request-Id": "tgi-7"})  # fmt: skip
    assert tgi.status_code == 200 and tgi.headers["x-request-id"] == "tgi-7"
    refused = httpx.post(
        f"{url}/v1/completions", json={"model": "nope", "prompt": "x"}, headers={"X-Request-Id": "r"}
    )
    assert refused.status_code == 404 and refused.headers["x-request-id"] == "r"
    spaced = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "To be"},
                        headers={"X-Request-Id": "has space"})  # fmt: skip
    assert spaced.json()["id"].startswith("cmpl-") and "x-request-id" not in spaced.headers
    bad = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "To be", "request_id": "a b"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "request_id"

    async def twice() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, headers={"X-Request-Id": "same"}, timeout=60) as client:
            body = {"model": "tiny", "prompt": "To be", "max_tokens": 20, "ignore_eos": True}
            return list(await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(4))))

    same = asyncio.run(twice())
    assert [r.status_code for r in same] == [200] * 4 and {r.json()["id"] for r in same} == {"cmpl-same"}
