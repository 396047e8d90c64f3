"""Embeddings from the served LLM (``SamplingParams.embed``, ``LLM.embed``, ``/v1/embeddings``):
the last prompt token's final hidden state, L2-normalized, against transformers' last hidden state
on the same weights."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import numpy as np
import openai
import pytest
import torch
import transformers
from server_process import ServerProcess, run_server

from inferd import LLM, SamplingParams
from inferd.config import ModelLoadError
from inferd.engine.async_llm import AsyncLLM
from inferd.engine.input_processor import PromptError
from inferd.sampling_params import SamplingParamsError


def _expected(folder, prompts: list[list[int]]) -> list[torch.Tensor]:
    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [
            torch.nn.functional.normalize(model(torch.tensor([p])).last_hidden_state[0, -1], dim=0)
            for p in prompts
        ]


def _prompts(vocab: int) -> list[list[int]]:
    head = [(7 * i + 3) % vocab for i in range(24)]
    return [
        head + [5, 6],
        [9],
        [(11 * i + 1) % vocab for i in range(45)],
        head + [(5 * i) % vocab for i in range(20)],
    ]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_embeddings_match_transformers_last_hidden_state(tiny_model_factory, arch: str) -> None:
    """Alone and in one batch, with a prompt longer than a step's budget (two chunks) and a
    shared head the prefix cache serves."""
    folder = tiny_model_factory(arch)
    llm = LLM(folder, kv_cache_memory="4MiB", block_size=8, max_num_batched_tokens=32)
    prompts = _prompts(llm.engine.config.model.vocab_size)
    expected = _expected(folder, prompts)
    first = llm.embed(prompts[:1])
    rest = llm.embed(prompts[1:])
    assert llm.engine.stats().prefix_hits > 0
    for ours, theirs in zip(first + rest, expected, strict=True):
        assert len(ours) == llm.engine.config.model.hidden_size
        assert (torch.tensor(ours) - theirs).abs().max().item() < 1e-5


def test_embedding_beside_generation_changes_neither(tiny_model_factory) -> None:
    folder = tiny_model_factory("qwen3")
    llm = LLM(folder, kv_cache_memory="4MiB", block_size=8)
    prompts = _prompts(llm.engine.config.model.vocab_size)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    alone = [out.token_ids for out in llm.generate(prompts, greedy)]
    embed = SamplingParams(max_tokens=1, temperature=0.0, embed=True)
    mixed = llm.generate(prompts + prompts, [greedy] * len(prompts) + [embed] * len(prompts))
    assert [out.token_ids for out in mixed[: len(prompts)]] == alone
    assert all(out.embedding is None for out in mixed[: len(prompts)])
    for out, theirs in zip(mixed[len(prompts) :], _expected(folder, prompts), strict=True):
        assert (torch.tensor(out.embedding) - theirs).abs().max().item() < 1e-5


async def test_the_embedding_crosses_from_an_engine_process(tiny_llama) -> None:
    llm = AsyncLLM.from_options(tiny_llama, engine_process=True, kv_cache_memory="8MiB")
    llm.start()
    try:
        prompt = [5, 6, 7, 8, 9]
        params = SamplingParams(max_tokens=1, temperature=0.0, embed=True)
        outputs = [out async for out in llm.generate("e", prompt, params)]
    finally:
        llm.shutdown()
    assert (
        torch.tensor(outputs[-1].embedding) - _expected(tiny_llama, [prompt])[0]
    ).abs().max().item() < 1e-5


def test_an_embedding_takes_one_token() -> None:
    with pytest.raises(SamplingParamsError, match="max_tokens: must be 1 to embed a prompt"):
        SamplingParams(max_tokens=4, embed=True)


@pytest.fixture(scope="module")
def server(tiny_llama) -> Iterator[ServerProcess]:
    with run_server(tiny_llama, "--kv-cache-memory", "8MiB", "--served-model-name", "tiny") as process:
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_the_openai_sdk_gets_the_llms_embeddings(client: openai.OpenAI, tiny_llama) -> None:
    texts = ["ROMEO: good night", "the rest is silence"]
    llm = LLM(tiny_llama, kv_cache_memory="4MiB")
    token_ids = [llm.tokenizer.encode(text) for text in texts]
    expected = _expected(tiny_llama, token_ids)
    response = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    assert response.model == "tiny" and [d.index for d in response.data] == [0, 1]
    assert response.usage.prompt_tokens == sum(len(ids) for ids in token_ids)
    for data, theirs in zip(response.data, expected, strict=True):
        assert (torch.tensor(data.embedding) - theirs).abs().max().item() < 1e-5
    # Token ids embed as their text does; base64 is little-endian float32.
    by_ids = client.embeddings.create(model="tiny", input=token_ids[0], encoding_format="float")
    assert by_ids.data[0].embedding == response.data[0].embedding
    raw = client.with_raw_response.embeddings.create(model="tiny", input=texts[:1], encoding_format="base64")
    encoded = raw.http_response.json()["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist() == response.data[0].embedding
    # Without a model, as vLLM: the served LLM's.
    import httpx

    unnamed = httpx.post(f"{client.base_url}embeddings", json={"input": texts[0]}, timeout=30).json()
    assert unnamed["model"] == "tiny" and unnamed["data"][0]["embedding"] == response.data[0].embedding


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"model": "other", "input": "x"}, 404, None),
        ({"model": "tiny", "input": ""}, 400, "input"),
        ({"model": "tiny", "input": [[]]}, 400, "input"),
        ({"model": "tiny", "input": [1.5]}, 400, "input"),
        ({"model": "tiny", "input": ["a", [5, 6]]}, 400, "input"),  # one form per request
        ({"model": "tiny", "input": "x", "dimensions": 3}, 400, "dimensions"),
        ({"model": "tiny", "input": "x", "encoding_format": "hex"}, 400, None),
        ({"model": "tiny", "input": "x " * 600}, 400, "input"),  # past the context
    ],
)
def test_embedding_errors_in_openais_shape(server: ServerProcess, body: dict, status: int, field) -> None:
    import httpx

    response = httpx.post(f"{server.base_url}/v1/embeddings", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and (field is None or error["param"] == field)


def test_truncate_prompt_tokens_keeps_each_inputs_last_tokens(server: ServerProcess, tiny_llama) -> None:
    """vLLM's ``truncate_prompt_tokens`` on every pooling route: the last k tokens, or with -1 as
    many as the context holds (a text past it is then embedded, not refused)."""
    import httpx

    llm = LLM(tiny_llama, kv_cache_memory="4MiB")
    text = "ROMEO: good night, good night"
    ids = llm.tokenizer.encode(text)
    url = f"{server.base_url}/v1/embeddings"
    kept = httpx.post(
        url, json={"model": "tiny", "input": text, "truncate_prompt_tokens": 3}, timeout=30
    ).json()
    last = httpx.post(url, json={"model": "tiny", "input": ids[-3:]}, timeout=30).json()
    assert (
        kept["data"][0]["embedding"] == last["data"][0]["embedding"] and kept["usage"]["prompt_tokens"] == 3
    )
    long = "x " * 600
    for path, body in (
        ("/v1/embeddings", {"model": "tiny", "input": long}),
        ("/pooling", {"model": "tiny", "input": long}),
        ("/v1/score", {"model": "tiny", "text_1": "a", "text_2": long}),
        ("/v1/rerank", {"model": "tiny", "query": "a", "documents": [long]}),
    ):
        refused = httpx.post(f"{server.base_url}{path}", json=body, timeout=30)
        assert refused.status_code == 400, path
        truncated = httpx.post(
            f"{server.base_url}{path}", json={**body, "truncate_prompt_tokens": -1}, timeout=60
        )
        assert truncated.status_code == 200, (path, truncated.text)
        for value in (0, True):  # not a count of tokens
            wrong = httpx.post(
                f"{server.base_url}{path}", json={**body, "truncate_prompt_tokens": value}, timeout=30
            )
            assert wrong.status_code == 400 and "truncate_prompt_tokens" in wrong.text, (path, value)


def test_pooling_gives_the_embeddings_and_classify_needs_a_classifier(server: ServerProcess) -> None:
    import httpx

    texts = ["ROMEO: good night", "the rest is silence"]
    embedded = httpx.post(
        f"{server.base_url}/v1/embeddings", json={"model": "tiny", "input": texts}, timeout=30
    )
    pooled = httpx.post(f"{server.base_url}/pooling", json={"model": "tiny", "input": texts}, timeout=30)
    assert pooled.status_code == 200, pooled.text
    assert [d["data"] for d in pooled.json()["data"]] == [d["embedding"] for d in embedded.json()["data"]]
    response = httpx.post(f"{server.base_url}/classify", json={"model": "tiny", "input": texts}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"
    assert "not a sequence classifier" in response.json()["error"]["message"]


def test_embeddings_count_as_requests_without_output_tokens(server: ServerProcess) -> None:
    import httpx

    tokens, stopped = "inferd:generation_tokens_total", "inferd:requests_finished_total{finish_reason=stop}"
    before = server.metrics()
    response = httpx.post(
        f"{server.base_url}/v1/embeddings", json={"model": "tiny", "input": ["a", "b c"]}, timeout=30
    )
    assert response.status_code == 200
    after = server.metrics()
    assert after.get(tokens, 0.0) == before.get(tokens, 0.0)
    assert after[stopped] == before.get(stopped, 0.0) + 2


def test_an_embedding_request_past_its_timeout_is_a_408(server: ServerProcess) -> None:
    import httpx

    texts = [" ".join(f"w{(7 * i + j) % 90}" for i in range(60)) for j in range(40)]
    bodies = {
        "/v1/embeddings": {"model": "tiny", "input": texts},
        "/v1/score": {"model": "tiny", "text_1": "a", "text_2": texts},
        "/v1/rerank": {"model": "tiny", "query": "a", "documents": texts},
    }
    for path, body in bodies.items():
        response = httpx.post(f"{server.base_url}{path}", json=body, headers={"X-Request-Timeout": "0.001"},
                              timeout=60)  # fmt: skip
        assert response.status_code == 408, (path, response.text)
        assert response.json()["error"]["message"]


def _cosines(tiny_llama, query: str, texts: list[str]) -> list[float]:
    llm = LLM(tiny_llama, kv_cache_memory="4MiB")
    vectors = [torch.tensor(v) for v in llm.embed([query, *texts])]
    return [float(vectors[0] @ v) for v in vectors[1:]]


def test_score_is_the_cosine_of_the_two_embeddings(server: ServerProcess, tiny_llama) -> None:
    import httpx

    texts = ["to be or not", "the rest is silence", "good night sweet prince"]
    expected = _cosines(tiny_llama, "ROMEO:", texts)
    body = {"model": "tiny", "text_1": "ROMEO:", "text_2": texts}
    one_to_many = httpx.post(f"{server.base_url}/v1/score", json=body, timeout=30).json()
    assert [d["index"] for d in one_to_many["data"]] == [0, 1, 2] and one_to_many["model"] == "tiny"
    assert np.allclose([d["score"] for d in one_to_many["data"]], expected, atol=1e-5)
    body = {"text_1": ["ROMEO:", texts[0]], "text_2": [texts[1], texts[0]]}
    pairwise = httpx.post(f"{server.base_url}/score", json=body, timeout=30).json()
    assert np.isclose(pairwise["data"][0]["score"], expected[1], atol=1e-5)
    assert np.isclose(pairwise["data"][1]["score"], 1.0, atol=1e-5)  # a text against itself


def test_rerank_orders_the_documents_by_score(server: ServerProcess, tiny_llama) -> None:
    import httpx

    documents = ["to be or not", "the rest is silence", "good night sweet prince", "ROMEO:"]
    expected = _cosines(tiny_llama, "ROMEO:", documents)
    order = sorted(range(len(documents)), key=lambda i: -expected[i])
    body = {"model": "tiny", "query": "ROMEO:", "documents": documents, "top_n": 3}
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        response = httpx.post(f"{server.base_url}{path}", json=body, timeout=30).json()
        assert [r["index"] for r in response["results"]] == order[:3]
        assert response["results"][0]["document"] == {"text": documents[order[0]]}
        scores = [r["relevance_score"] for r in response["results"]]
        assert np.allclose(scores, [expected[i] for i in order[:3]], atol=1e-5)
    # vLLM's default top_n of 0 means all; documents may come as objects with their text.
    objects = [{"text": document} for document in documents]
    bare = httpx.post(f"{server.base_url}/v1/rerank",
                      json={**body, "documents": objects, "return_documents": False, "top_n": 0},
                      timeout=30).json()  # fmt: skip
    assert [r["index"] for r in bare["results"]] == order and "document" not in bare["results"][0]


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("/v1/score", {"model": "tiny", "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, 400, "text_2"),
        ("/v1/score", {"model": "tiny", "text_1": [], "text_2": "c"}, 400, "text_1"),
        ("/v1/score", {"model": "tiny", "text_1": "a", "text_2": ""}, 400, "text_2"),
        ("/v1/score", {"model": "other", "text_1": "a", "text_2": "b"}, 404, "model"),
        ("/v1/rerank", {"model": "tiny", "query": "a", "documents": []}, 400, "documents"),
        ("/v1/rerank", {"model": "tiny", "query": "a", "documents": ["b"], "top_n": -1}, 400, None),
        ("/v1/score", {"model": "tiny", "text_1": "", "text_2": "c"}, 400, "text_1"),
        ("/v1/score", {"model": "tiny", "text_1": "a " * 600, "text_2": "c"}, 400, "text_1"),
        ("/v1/rerank", {"model": "tiny", "query": "a", "documents": ["b", ""]}, 400, "documents"),
    ],
)
def test_score_and_rerank_errors(server: ServerProcess, path: str, body: dict, status: int, field) -> None:
    import httpx

    response = httpx.post(f"{server.base_url}{path}", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and (field is None or error["param"] == field)


def test_a_model_trained_for_shorter_embeddings_gives_them(tiny_model_factory) -> None:
    """Matryoshka widths (Qwen3-Embedding's): the first ``dimensions`` values of the embedding,
    normalized again; a width the model names, or any with ``is_matryoshka``; refused for other
    models."""
    folder = tiny_model_factory("qwen3")
    prompts = _prompts(64)[:2]
    full = [torch.tensor(vector) for vector in LLM(folder, kv_cache_memory="4MiB").embed(prompts)]
    named = LLM(folder, kv_cache_memory="4MiB", hf_overrides={"matryoshka_dimensions": [16, 32]})
    for ours, whole in zip(named.embed(prompts, dimensions=16), full, strict=True):
        assert len(ours) == 16
        assert (
            torch.tensor(ours) - torch.nn.functional.normalize(whole[:16], dim=0)
        ).abs().max().item() < 1e-6
    assert len(named.embed(prompts, dimensions=64)[0]) == 64  # its own width, always
    with pytest.raises(ValueError, match=r"trained for embeddings of \[16, 32\] dimensions, not 8"):
        named.embed(prompts, dimensions=8)
    any_width = LLM(folder, kv_cache_memory="4MiB", hf_overrides={"is_matryoshka": True})
    assert len(any_width.embed(prompts, dimensions=5)[1]) == 5
    with pytest.raises(ValueError, match="dimensions must be from 1 to the model's 64, got 65"):
        any_width.embed(prompts, dimensions=65)
    with pytest.raises(ValueError, match="was not trained for shorter ones"):
        LLM(folder, kv_cache_memory="4MiB").embed(prompts, dimensions=16)
    with pytest.raises(ModelLoadError, match="matryoshka_dimensions must be a list of positive widths"):
        LLM(folder, kv_cache_memory="4MiB", hf_overrides={"matryoshka_dimensions": [16, 0]})


def test_shorter_embeddings_over_http(tiny_model_factory) -> None:
    folder = tiny_model_factory("qwen3")
    whole = torch.tensor(LLM(folder, kv_cache_memory="4MiB").embed(["ROMEO:"])[0])
    overrides = '{"matryoshka_dimensions": [16]}'
    with run_server(folder, "--kv-cache-memory", "8MiB", "--hf-overrides", overrides) as server:
        import httpx

        url = f"{server.base_url}/v1/embeddings"
        model = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
        short = httpx.post(url, json={"model": model, "input": "ROMEO:", "dimensions": 16}, timeout=30)
        assert short.status_code == 200, short.text
        expected = torch.nn.functional.normalize(whole[:16], dim=0)
        # Another process's float32 sums may round otherwise (4e-5 seen once in a full run).
        assert (torch.tensor(short.json()["data"][0]["embedding"]) - expected).abs().max().item() < 2e-4
        refused = httpx.post(url, json={"model": model, "input": "ROMEO:", "dimensions": 8}, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "dimensions"


def test_a_pooled_prompt_may_fill_the_whole_context(tiny_model_factory) -> None:
    """An embedding's prompt needs no room for an output token (its one sample is dropped): a
    prompt of exactly ``max_model_len`` tokens embeds as transformers embeds it, in chunks too;
    a longer one, or a generation of that length, is refused."""
    folder = tiny_model_factory("qwen3")
    llm = LLM(folder, kv_cache_memory="4MiB", block_size=8, max_model_len=40, max_num_batched_tokens=16)
    prompt = [(13 * i + 2) % 64 for i in range(40)]
    (ours,) = llm.embed([prompt])
    (theirs,) = _expected(folder, [prompt])
    assert (torch.tensor(ours) - theirs).abs().max().item() < 1e-5
    with pytest.raises(PromptError, match="maximum context length is 40 tokens, but the prompt has 41"):
        llm.embed([[*prompt, 5]])
    with pytest.raises(PromptError, match="leaves no room for the one token every request computes"):
        llm.generate([prompt], SamplingParams(max_tokens=1))


@pytest.mark.parametrize("template", ["<|user|> $A", "$A <|eos|>", "<|user|> $A <|eos|>", "$A"])
def test_truncation_keeps_the_special_tokens_around_a_text(
    tiny_model_factory, tmp_path, template: str
) -> None:
    """As transformers' left truncation: a BOS before the text and an EOS after it (what last-token
    pooling reads) survive; the text's own tokens are cut from the left."""
    import shutil

    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import processors

    from inferd.engine.tokenizer import Tokenizer

    folder = shutil.copytree(tiny_model_factory("qwen3"), tmp_path / "m")
    raw = RawTokenizer.from_file(str(folder / "tokenizer.json"))
    specials = [(token, raw.token_to_id(token)) for token in ("<|user|>", "<|eos|>") if token in template]
    raw.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    raw.save(str(folder / "tokenizer.json"))
    ours = Tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder, truncation_side="left")
    text = "ROMEO: good night, good night! parting is such sweet sorrow"
    assert len(ours.encode(text)) > 12
    for keep in (3, 7, 12, 200):
        expected = theirs(text, truncation=True, max_length=keep)["input_ids"]
        assert ours.encode_last(text, keep) == expected, keep


def test_a_conversation_is_embedded_as_its_chat_template_renders_it(
    server: ServerProcess, tiny_llama
) -> None:
    """vLLM's chat form of an embeddings request: ``messages`` rendered by the chat template (no
    generation prompt unless asked), then embedded as one input."""
    import httpx

    llm = LLM(tiny_llama, kv_cache_memory="4MiB")
    messages = [
        {"role": "system", "content": "Embed this."},
        {"role": "user", "content": "ROMEO: good night"},
    ]
    url = f"{server.base_url}/v1/embeddings"
    for add_generation_prompt in (False, True):
        body = {"model": "tiny", "messages": messages, "add_generation_prompt": add_generation_prompt}
        response = httpx.post(url, json=body, timeout=30)
        assert response.status_code == 200, response.text
        rendered = llm.tokenizer.apply_chat_template(messages, add_generation_prompt)
        ids = llm.tokenizer.encode(rendered, add_special_tokens=False)
        assert response.json()["usage"]["prompt_tokens"] == len(ids)
        (expected,) = llm.embed([ids])
        assert response.json()["data"][0]["embedding"] == pytest.approx(expected, abs=1e-5)
    for body, field in (
        ({"model": "tiny", "messages": messages, "input": "x"}, "input"),
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": [{"role": "narrator", "content": "x"}]}, "messages"),
        ({"model": "tiny", "messages": messages, "continue_final_message": True}, "continue_final_message"),
        # Errors of the rendered prompt name the messages: one past the context.
        ({"model": "tiny", "messages": [{"role": "user", "content": "x " * 600}]}, "messages"),
    ):
        refused = httpx.post(url, json=body, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field, refused.text
