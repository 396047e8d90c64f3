"""The TGI-compatible API of a real `inferd serve`, driven by `huggingface_hub.InferenceClient`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError
from server_process import ServerProcess, run_server


@pytest.fixture(scope="module")
def server(tiny_llama) -> Iterator[ServerProcess]:
    with run_server(tiny_llama, "--kv-cache-memory", "8MiB") as process:
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> InferenceClient:
    return InferenceClient(base_url=server.base_url)


def test_text_generation_streamed_and_not_agree(client: InferenceClient) -> None:
    whole = client.text_generation("To be, or not", max_new_tokens=12)
    assert isinstance(whole, str) and whole
    pieces = list(client.text_generation("To be, or not", max_new_tokens=12, stream=True))
    assert "".join(pieces) == whole


def test_details_count_tokens_and_give_a_finish_reason(client: InferenceClient) -> None:
    result = client.text_generation("To be", max_new_tokens=5, details=True, top_n_tokens=2)
    assert result.details is not None
    assert result.details.finish_reason == "length"
    assert result.details.generated_tokens == len(result.details.tokens) == 5
    assert all(token.logprob <= 0 for token in result.details.tokens)
    assert result.details.top_tokens is not None and all(len(top) == 2 for top in result.details.top_tokens)


def test_stream_details_arrive_with_the_last_token(client: InferenceClient) -> None:
    events = list(client.text_generation("To be", max_new_tokens=4, details=True, stream=True))
    assert [event.index for event in events] == [1, 2, 3, 4]
    assert all(event.details is None for event in events[:-1])
    last = events[-1]
    assert last.details is not None and last.details.generated_tokens == 4
    assert last.generated_text == "".join(event.token.text for event in events)


def test_seeded_sampling_is_reproducible_and_reported(client: InferenceClient) -> None:
    kwargs = {"max_new_tokens": 10, "do_sample": True, "temperature": 1.0, "seed": 42, "details": True}
    first = client.text_generation("Whether", **kwargs)
    second = client.text_generation("Whether", **kwargs)
    assert first.generated_text == second.generated_text
    assert first.details is not None and first.details.seed == 42
    streamed = client.text_generation("Whether", stream=True, **kwargs)
    assert "".join(event.token.text for event in streamed) == first.generated_text


def test_stop_sequence(client: InferenceClient) -> None:
    free = client.text_generation("To be", max_new_tokens=30, do_sample=True, seed=9)
    stop = free[8:11]
    result = client.text_generation(
        "To be", max_new_tokens=30, do_sample=True, seed=9, stop=[stop], details=True
    )
    # As in TGI, the text ends with the stop sequence that ended it.
    assert result.generated_text == free[: free.index(stop) + len(stop)]
    assert result.details is not None and result.details.finish_reason == "stop_sequence"
    # Each streamed token carries its own text, not text held back from the tokens before it.
    events = list(
        client.text_generation(
            "To be", max_new_tokens=30, do_sample=True, seed=9, stop=[stop], stream=True, details=True
        )
    )
    assert "".join(event.token.text for event in events) == result.generated_text


def test_typical_p_samples_from_the_most_typical_tokens(client: InferenceClient) -> None:
    """A typical_p turns sampling on, as in TGI (the seed is reported); one so small that only each
    step's most typical token is left draws the same text whatever the seed."""
    texts = set()
    for seed in (1, 2, 3):
        result = client.text_generation("Whether", max_new_tokens=9, typical_p=0.001, seed=seed, details=True)
        assert result.details is not None and result.details.seed == seed
        texts.add(result.generated_text)
    assert len(texts) == 1
    # Without it the seeds do draw differently.
    free = {client.text_generation("Whether", max_new_tokens=9, do_sample=True, seed=s) for s in (1, 2, 3)}
    assert len(free) > 1


def test_neutral_sampling_settings_stay_greedy(client: InferenceClient) -> None:
    greedy = client.text_generation("Whether", max_new_tokens=12)
    result = client.text_generation("Whether", max_new_tokens=12, details=True, temperature=1.0)
    assert result.generated_text == greedy
    assert result.details is not None and result.details.seed is None
    seeded_greedy = client.text_generation("Whether", max_new_tokens=12, details=True, seed=3)
    assert seeded_greedy.generated_text == greedy
    assert seeded_greedy.details is not None and seeded_greedy.details.seed is None  # as TGI: no sampling


def test_the_implicit_max_new_tokens_is_capped_not_refused(tiny_llama) -> None:
    with run_server(tiny_llama, "--kv-cache-memory", "8MiB", "--max-tokens-cap", "5") as capped:
        response = httpx.post(
            f"{capped.base_url}/generate", json={"inputs": "To be", "parameters": {"details": True}}
        )
        assert response.status_code == 200, response.text
        assert response.json()["details"]["generated_tokens"] <= 5
        asked = httpx.post(
            f"{capped.base_url}/generate", json={"inputs": "To be", "parameters": {"max_new_tokens": 6}}
        )
        assert asked.status_code == 422 and "max_new_tokens" in asked.json()["error"]


def test_return_full_text_and_generate_route(server: ServerProcess) -> None:
    body = {"inputs": "To be", "parameters": {"max_new_tokens": 3, "return_full_text": True}}
    response = httpx.post(f"{server.base_url}/generate", json=body)
    assert response.status_code == 200
    assert response.json()["generated_text"].startswith("To be")


def test_whole_answers_carry_tgis_timing_headers(server: ServerProcess) -> None:
    """TGI's headers, on `/generate` and the compat route's whole answer: times in milliseconds
    whose parts fit in the total, the token counts, the prompt's characters, the device."""
    body = {"inputs": "To be, or not", "parameters": {"max_new_tokens": 6}}
    for route, wrap in (("/generate", dict), ("/", list)):
        answer = httpx.post(f"{server.base_url}{route}", json=body)
        assert answer.status_code == 200 and isinstance(answer.json(), wrap)
        h = answer.headers
        assert (h["x-generated-tokens"], h["x-compute-characters"], h["x-compute-type"]) == ("6", "13", "cpu")
        tokens = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "To be, or not"}).json()["count"]
        assert int(h["x-prompt-tokens"]) == tokens
        parts = [int(h[f"x-{name}-time"]) for name in ("validation", "queue", "inference")]
        # The parts cover the total, each cut to whole milliseconds.
        assert int(h["x-total-time"]) - 3 <= sum(parts) <= int(h["x-total-time"]) + 2
        assert abs(int(h["x-time-per-token"]) * 6 - int(h["x-inference-time"])) <= 6  # 6 tokens
        assert abs(float(h["x-compute-time"]) * 1000 - int(h["x-total-time"])) <= 1
    streamed = httpx.post(f"{server.base_url}/generate_stream", json=body)
    assert "x-total-time" not in streamed.headers  # a stream's headers go out before its times are known


def test_tgi_clients_chat_without_knowing_the_models_name(
    server: ServerProcess, client: InferenceClient
) -> None:
    """huggingface_hub's chat_completion against a URL sends the model "dummy", TGI's docs "tgi":
    both reach the served model, as TGI (which ignores the field) answers them; another unknown
    name is still a 404."""
    messages = [{"role": "user", "content": "To be, or not"}]
    answer = client.chat_completion(messages, max_tokens=3)
    assert answer.choices[0].message.content and answer.usage.completion_tokens == 3
    for name, status in (("tgi", 200), ("dummy", 200), ("other", 404)):
        body = {"model": name, "messages": messages, "max_tokens": 2}
        assert httpx.post(f"{server.base_url}/v1/chat/completions", json=body).status_code == status, name


def test_validation_errors_are_422_in_tgi_shape(server: ServerProcess, client: InferenceClient) -> None:
    with pytest.raises(ValidationError):
        client.text_generation("To be", max_new_tokens=5000)
    for parameters in ({"max_new_tokens": 0}, {"typical_p": 1.0}, {"watermark": True}, {"temperature": -1}):
        response = httpx.post(f"{server.base_url}/generate", json={"inputs": "hi", "parameters": parameters})
        assert response.status_code == 422
        assert set(response.json()) == {"error", "error_type"}
        assert response.json()["error_type"] == "validation"
    malformed = httpx.post(
        f"{server.base_url}/generate_stream", content=b"[", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 422 and malformed.json()["error_type"] == "validation"


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),  # TGI refuses 1 rather than read it as off
        ({"top_p": 0.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"truncate": 10_000}, "`truncate` must be strictly positive and less than 511. Given: 10000"),
        ({"truncate": 0}, "`truncate` must be strictly positive and less than 511. Given: 0"),
        # TGI asks only > 0; the engine's own bound (10) is the one this server has.
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": 20.0}, "repetition_penalty: must be in (0, 10]"),
    ],
)
def test_tgis_own_bounds_and_messages(server: ServerProcess, parameters: dict, message: str) -> None:  # type: ignore[type-arg]
    assert httpx.get(f"{server.base_url}/info").json()["max_input_tokens"] == 511
    for route in ("/generate", "/generate_stream"):
        body = {"inputs": "To be", "parameters": {"max_new_tokens": 2, **parameters}}
        response = httpx.post(f"{server.base_url}{route}", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["error_type"] == "validation" and message in response.json()["error"]
    for ok in ({"top_p": 0.99}, {"truncate": 511}, {"repetition_penalty": 10.0}):
        body = {"inputs": "To be", "parameters": {"max_new_tokens": 2, **ok}}
        assert httpx.post(f"{server.base_url}/generate", json=body).status_code == 200, ok


def test_decoder_input_details_give_the_prompts_tokens_with_their_logprobs(
    server: ServerProcess, client: InferenceClient
) -> None:
    """As TGI: details.prefill is the prompt's tokens, the first without a log-probability."""
    prompt = "To be, or not"
    result = client.text_generation(prompt, max_new_tokens=2, details=True, decoder_input_details=True)
    assert result.details is not None
    prefill = result.details.prefill
    assert len(prefill) > 2 and prefill[0].logprob is None
    assert all(token.logprob is not None and token.logprob <= 0 for token in prefill[1:])
    assert "".join(token.text for token in prefill) == prompt
    plain = client.text_generation(prompt, max_new_tokens=2, details=True)
    assert plain.details is not None and plain.details.prefill == []
    streamed = httpx.post(
        f"{server.base_url}/generate_stream",
        json={"inputs": prompt, "parameters": {"details": True, "decoder_input_details": True}},
    )
    assert streamed.status_code == 422 and "streaming" in streamed.json()["error"]


def test_info_and_health(server: ServerProcess) -> None:
    info = httpx.get(f"{server.base_url}/info").json()
    assert info["max_total_tokens"] == 512 and info["model_id"] == server.model
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def _mean_logprob(tokens) -> float:  # type: ignore[no-untyped-def]
    return sum(token.logprob for token in tokens) / len(tokens)


def test_best_of_answers_the_likeliest_of_its_candidates(
    server: ServerProcess, client: InferenceClient
) -> None:
    """As TGI: best_of candidates sampled, each with a seed of its own; the answer is the one whose
    tokens have the highest mean log-probability, the others in details.best_of_sequences."""
    result = client.text_generation(
        "Whether", max_new_tokens=12, do_sample=True, temperature=1.5, best_of=2, details=True
    )
    assert result.details is not None and result.details.best_of_sequences is not None
    (other,) = result.details.best_of_sequences
    assert result.details.seed is not None and other.seed is not None and other.seed != result.details.seed
    assert len(result.details.tokens) == result.details.generated_tokens
    assert _mean_logprob(result.details.tokens) >= _mean_logprob(other.tokens)
    # Each candidate is the sample its reported seed gives.
    for seed, text in ((result.details.seed, result.generated_text), (other.seed, other.generated_text)):
        again = client.text_generation(
            "Whether", max_new_tokens=12, do_sample=True, temperature=1.5, seed=seed
        )
        assert again == text
    # More requests: were the first candidate always the answer, about half of them would fail.
    for _ in range(6):
        parameters = {
            "max_new_tokens": 8,
            "do_sample": True,
            "temperature": 1.5,
            "best_of": 2,
            "details": True,
        }
        body = {"inputs": "Whether", "parameters": parameters}
        details = httpx.post(f"{server.base_url}/generate", json=body).json()["details"]
        (loser,) = details["best_of_sequences"]
        assert _mean_logprob_of(details["tokens"]) >= _mean_logprob_of(loser["tokens"])


def test_best_of_candidates_share_one_scoring_of_the_prompt(server: ServerProcess) -> None:
    """decoder_input_details with best_of: every candidate's prefill holds the prompt's scores,
    computed by the first candidate alone; the other looks the prompt up in the prefix cache, where
    each candidate scored it again (bypassing the cache: no queries)."""
    inputs = "To be, or not to be, that is the question"
    parameters: dict[str, Any] = {"max_new_tokens": 3, "details": True, "decoder_input_details": True}
    body = {"inputs": inputs, "parameters": parameters}
    alone = httpx.post(f"{server.base_url}/generate", json=body).json()["details"]["prefill"]
    assert len(alone) > 1 and alone[0]["logprob"] is None
    queries = "inferd:prefix_cache_queries_total"
    before = server.metrics()
    parameters.update(do_sample=True, temperature=1.5, best_of=2)
    details = httpx.post(f"{server.base_url}/generate", json=body).json()["details"]
    after = server.metrics()
    (other,) = details["best_of_sequences"]
    for prefill in (details["prefill"], other["prefill"]):
        assert [token["id"] for token in prefill] == [token["id"] for token in alone]
        assert [token["logprob"] for token in prefill[1:]] == pytest.approx(
            [token["logprob"] for token in alone[1:]], abs=1e-5
        )
    assert after[queries] - before.get(queries, 0.0) == len(alone)


def _mean_logprob_of(tokens: list[dict]) -> float:  # type: ignore[type-arg]
    return sum(token["logprob"] for token in tokens) / len(tokens)


def test_best_of_follows_tgis_rules(server: ServerProcess) -> None:
    assert httpx.get(f"{server.base_url}/info").json()["max_best_of"] == 2
    sampled = {"do_sample": True, "max_new_tokens": 4}
    refused = {
        "sampling": ({"best_of": 2, "max_new_tokens": 4}, "/generate"),
        "seed must not be set": ({**sampled, "best_of": 2, "seed": 1}, "/generate"),
        "<= 2": ({**sampled, "best_of": 3}, "/generate"),
        "streaming": ({**sampled, "best_of": 2}, "/generate_stream"),
    }
    for message, (parameters, route) in refused.items():
        response = httpx.post(f"{server.base_url}{route}", json={"inputs": "hi", "parameters": parameters})
        assert response.status_code == 422, (message, response.text)
        assert message in response.json()["error"] and response.json()["error_type"] == "validation"
    one = {**sampled, "best_of": 1, "details": True}
    plain = httpx.post(f"{server.base_url}/generate", json={"inputs": "hi", "parameters": one})
    assert plain.status_code == 200 and plain.json()["details"]["best_of_sequences"] is None


def test_tokenize_answers_tgis_body_in_tgis_shape(server: ServerProcess) -> None:
    """TGI's /tokenize shares vLLM's path: a body of ``inputs`` gets TGI's list of tokens, each with
    the characters of the input it came from; ``prompt`` still gets vLLM's answer."""
    text = "Café au lait"
    tokens = httpx.post(f"{server.base_url}/tokenize", json={"inputs": text}).json()
    vllm = httpx.post(f"{server.base_url}/tokenize", json={"prompt": text}).json()
    assert [token["id"] for token in tokens] == vllm["tokens"]
    assert all(token["text"] == text[token["start"] : token["stop"]] for token in tokens)
    spans = [(token["start"], token["stop"]) for token in tokens if token["stop"] > token["start"]]
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    # In order; the two tokens "é" is split over both give its one character.
    assert spans == sorted(spans) and ("é", 3, 4) in [(t["text"], t["start"], t["stop"]) for t in tokens]
    bare_body = {"inputs": text, "add_special_tokens": False}
    bare = httpx.post(f"{server.base_url}/tokenize", json=bare_body).json()
    own = httpx.post(
        f"{server.base_url}/tokenize", json={"prompt": text, "add_special_tokens": False}
    ).json()["tokens"]
    assert [token["id"] for token in bare] == own
    # TGI's truncate keeps the input's last tokens.
    truncated = {"inputs": text, "parameters": {"truncate": 3}}
    cut = httpx.post(f"{server.base_url}/tokenize", json=truncated).json()
    assert cut == tokens[-3:]
