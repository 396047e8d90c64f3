"""Sequence classifiers (``*ForSequenceClassification``): the engine serves their head in the LM
head's place and pools each prompt into label logits (``LLM.classify``), checked against
transformers on the same folders."""

from __future__ import annotations

import base64
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import transformers
from server_process import ServerProcess, run_server
from tiny_models import copy_with_config, copy_with_tensors, split_tokenizer
from tokenizers import Tokenizer, processors

from inferd import LLM, SamplingParams
from inferd.config import ModelConfig, ModelLoadError
from inferd.engine.input_processor import PromptError
from inferd.engine.outputs import ClassificationOutput
from inferd.engine.scoring import PairingError


def _prompts(vocab: int) -> list[list[int]]:
    return [[(11 * i + 7 * j + 5) % (vocab - 1) + 1 for i in range(3 + 9 * j)] for j in range(5)]


def _their_logits(folder: Path, prompts: list[list[int]]) -> list[list[float]]:
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, dtype=torch.float32
    ).eval()
    with torch.inference_mode():
        return [model(torch.tensor([ids])).logits[0].tolist() for ids in prompts]


@pytest.mark.parametrize("arch", ["llama-classifier", "qwen3-reward"])
def test_label_logits_match_transformers(tiny_model_factory, arch: str) -> None:
    folder = tiny_model_factory(arch)
    cfg = ModelConfig.from_folder(folder)
    prompts = _prompts(cfg.vocab_size)
    theirs = _their_logits(folder, prompts)
    # A small token budget chunks the longer prompts; a second pass reads them from the prefix cache.
    llm = LLM(folder, kv_cache_memory="16MiB", block_size=8, max_num_batched_tokens=16)
    for _ in range(2):
        outputs = llm.classify(prompts)
        for output, expected in zip(outputs, theirs, strict=True):
            assert len(output.logits) == len(cfg.labels)
            assert max(abs(a - b) for a, b in zip(output.logits, expected, strict=True)) < 1e-4
            assert output.label == cfg.labels[max(range(len(expected)), key=expected.__getitem__)]
    assert llm.engine.core.runner.model.lm_head.weight.shape == (len(cfg.labels), cfg.hidden_size)


# Each causal LM architecture's classifier (transformers' class) for a tiny model of that LM.
_CLASSIFIERS_OF = {
    "gemma": "GemmaForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification",
    "gemma3": "Gemma3TextForSequenceClassification",
    "phi3": "Phi3ForSequenceClassification",
    "smollm3": "SmolLM3ForSequenceClassification",
    "mixtral": "MixtralForSequenceClassification",
    "qwen2-moe": "Qwen2MoeForSequenceClassification",
    "qwen3-moe": "Qwen3MoeForSequenceClassification",
}


@pytest.mark.parametrize("arch", sorted(_CLASSIFIERS_OF))
def test_every_architectures_classifier_matches_transformers(tiny_model_factory, tmp_path, arch: str) -> None:
    """The tiny causal LM with a random head of two labels in its LM head's place (``score``), as
    that architecture's classifier stores it. Gemma 2's and 3's capped logits are the LM's: the
    classifiers read their head uncapped."""
    source = tiny_model_factory(arch)
    hidden = ModelConfig.from_folder(source).hidden_size

    def swap_head(tensors: dict[str, torch.Tensor]) -> None:
        tensors.pop("lm_head.weight", None)
        tensors["score.weight"] = torch.randn(2, hidden, generator=torch.Generator().manual_seed(1))

    folder = copy_with_tensors(source, tmp_path / "heads", swap_head)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=[_CLASSIFIERS_OF[arch]], id2label={"0": "no", "1": "yes"})
    (folder / "config.json").write_text(json.dumps(config))
    cfg = ModelConfig.from_folder(folder)
    assert cfg.labels == ("no", "yes") and not cfg.tie_word_embeddings
    prompts = _prompts(cfg.vocab_size)
    theirs = _their_logits(folder, prompts)
    outputs = LLM(folder, kv_cache_memory="16MiB", block_size=8, max_num_batched_tokens=16).classify(prompts)
    for output, expected in zip(outputs, theirs, strict=True):
        assert max(abs(a - b) for a, b in zip(output.logits, expected, strict=True)) < 1e-4


def test_labels_and_head_are_read_from_the_config(tiny_model_factory) -> None:
    cfg = ModelConfig.from_folder(tiny_model_factory("llama-classifier"))
    # The causal LM's architecture, its own head (not the tied embeddings its config names).
    assert cfg.architecture == "LlamaForCausalLM" and cfg.labels == ("negative", "neutral", "positive")
    assert not cfg.tie_word_embeddings and cfg.head_size == 3
    assert ModelConfig.from_folder(tiny_model_factory("qwen3")).labels == ()


def test_probabilities_are_softmax_or_a_single_labels_sigmoid() -> None:
    three = ClassificationOutput.from_logits([1.0, 3.0, 2.0], ("a", "b", "c"))
    exps = [math.exp(v) for v in (1.0, 3.0, 2.0)]
    assert three.label == "b" and three.probs == pytest.approx([v / sum(exps) for v in exps])
    one = ClassificationOutput.from_logits([0.5], ("score",))
    assert one.probs == pytest.approx([1 / (1 + math.exp(-0.5))]) and one.label == "score"
    # Far logits neither overflow nor lose the other labels' share.
    assert ClassificationOutput.from_logits([-800.0], ("score",)).probs == [0.0]
    assert ClassificationOutput.from_logits([900.0, 0.0], ("a", "b")).probs == [1.0, 0.0]
    with pytest.raises(ValueError, match="non-finite logits"):
        ClassificationOutput.from_logits([float("inf"), 0.0], ("a", "b"))


def test_a_classifier_does_not_generate_and_an_lm_does_not_classify(tiny_model_factory) -> None:
    llm = LLM(tiny_model_factory("llama-classifier"), kv_cache_memory="4MiB")
    with pytest.raises(PromptError, match=r"sequence classifier \(3 labels\): it classifies prompts"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="not a sequence classifier"):
        LLM(tiny_model_factory("llama"), kv_cache_memory="4MiB").classify([[5, 6, 7]])


def test_a_classifiers_requests_take_no_vocabulary_options(tiny_model_factory) -> None:
    llm = LLM(tiny_model_factory("qwen3-reward"), kv_cache_memory="4MiB")
    for options in (
        {"prompt_logprobs": 1},
        {"logprobs": 2},
        {"repetition_penalty": 1.2},
        {"logit_bias": {3: 1.0}},
    ):
        name = "penalties" if "repetition_penalty" in options else next(iter(options))
        with pytest.raises(PromptError, match=f"take no {name}: they pool the prompt"):
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=1, temperature=0.0, embed=True, **options))
    assert len(llm.classify([[5, 6, 7]])[0].probs) == 1


def test_labels_from_num_labels_and_a_stray_lm_head(tiny_model_factory, tmp_path) -> None:
    """A config may give ``num_labels`` without names, and a checkpoint may keep its LM's head
    beside the classifier's (transformers reads both so)."""
    source = tiny_model_factory("qwen3-reward")
    config = json.loads((source / "config.json").read_text())
    head = torch.zeros(config["vocab_size"], config["hidden_size"])
    folder = copy_with_tensors(source, tmp_path / "m", lambda t: t.update({"lm_head.weight": head}))
    config.pop("id2label"), config.pop("label2id")
    (folder / "config.json").write_text(json.dumps({**config, "num_labels": 1}))
    assert ModelConfig.from_folder(folder).labels == ("LABEL_0",)
    prompts = [[5, 6, 7, 8]]
    ours = LLM(folder, kv_cache_memory="4MiB").classify(prompts)[0].logits
    assert ours == pytest.approx(_their_logits(folder, prompts)[0], abs=1e-4)


def test_a_checkpoint_without_its_head_is_refused(tiny_model_factory, tmp_path) -> None:
    folder = copy_with_tensors(
        tiny_model_factory("llama-classifier"), tmp_path / "m", lambda t: t.pop("score.weight")
    )
    with pytest.raises(ModelLoadError, match=r"lacks tensors: score.weight$"):
        LLM(folder, kv_cache_memory="4MiB")


@pytest.mark.parametrize(
    ("id2label", "message"),
    [
        ({"0": "a", "2": "c"}, "every label from 0 to 1"),
        ({"x": "a"}, "keys must be indices"),
        (["a"], "object"),
    ],
)
def test_label_names_are_checked(tiny_model_factory, tmp_path, id2label, message) -> None:
    folder = copy_with_config(tiny_model_factory("llama-classifier"), tmp_path / "m", id2label=id2label)
    with pytest.raises(ModelLoadError, match=message):
        LLM(folder, kv_cache_memory="4MiB")


@pytest.fixture(scope="module")
def server(tiny_model_factory) -> Iterator[ServerProcess]:
    folder = tiny_model_factory("llama-classifier")
    with run_server(folder, "--kv-cache-memory", "8MiB", "--served-model-name", "sentiment") as process:
        yield process


def test_classify_answers_in_vllms_shape(server: ServerProcess, tiny_model_factory) -> None:
    folder = tiny_model_factory("llama-classifier")
    llm = LLM(folder, kv_cache_memory="4MiB")
    texts = ["ROMEO: good night", "the rest is silence"]
    expected = _their_logits(folder, [llm.tokenizer.encode(text) for text in texts])
    for path in ("/classify", "/v1/classify"):
        response = httpx.post(
            f"{server.base_url}{path}", json={"model": "sentiment", "input": texts}, timeout=30
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "list" and body["model"] == "sentiment" and body["id"].startswith("classify")
        assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] > 0
        for item, logits in zip(body["data"], expected, strict=True):
            verdict = ClassificationOutput.from_logits(logits, ("negative", "neutral", "positive"))
            assert item["num_classes"] == 3 and item["label"] == verdict.label
            assert item["probs"] == pytest.approx(verdict.probs, abs=1e-5)
    # vLLM's use_activation (activation before it) false: the raw logits in place of the probabilities.
    for flag in ("use_activation", "activation"):
        raw = httpx.post(f"{server.base_url}/classify", json={"input": texts, flag: False}, timeout=30).json()
        for item, logits in zip(raw["data"], expected, strict=True):
            assert item["probs"] == pytest.approx(logits, abs=1e-4)
    # A conversation (vLLM's chat form) classifies as its rendered template does.
    messages = [{"role": "user", "content": texts[0]}]
    ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages, False), add_special_tokens=False)
    chat = httpx.post(f"{server.base_url}/classify", json={"messages": messages}, timeout=30).json()
    (rendered,) = _their_logits(folder, [ids])
    verdict = ClassificationOutput.from_logits(rendered, ("negative", "neutral", "positive"))
    assert chat["data"][0]["probs"] == pytest.approx(verdict.probs, abs=1e-5)
    # Token ids classify as their text does; /pooling gives the raw logits.
    ids = llm.tokenizer.encode(texts[0])
    by_ids = httpx.post(f"{server.base_url}/classify", json={"input": ids}, timeout=30).json()
    assert by_ids["data"][0]["probs"] == pytest.approx(body["data"][0]["probs"], abs=1e-6)
    pooled = httpx.post(f"{server.base_url}/pooling", json={"input": texts[:1]}, timeout=30).json()
    assert pooled["data"][0]["object"] == "pooling"
    assert pooled["data"][0]["data"] == pytest.approx(expected[0], abs=1e-4)
    as_base64 = httpx.post(
        f"{server.base_url}/pooling", json={"input": texts[:1], "encoding_format": "base64"}, timeout=30
    ).json()["data"][0]["data"]
    decoded = np.frombuffer(base64.b64decode(as_base64), dtype="<f4").tolist()
    assert decoded == pytest.approx(pooled["data"][0]["data"], abs=1e-6)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/completions", {"model": "sentiment", "prompt": "hello", "max_tokens": 3}, None),
        ("/v1/embeddings", {"model": "sentiment", "input": "hello"}, "model"),
        ("/v1/score", {"model": "sentiment", "text_1": "a", "text_2": "b"}, "model"),
        ("/classify", {"model": "sentiment", "input": []}, "input"),
        ("/classify", {"model": "sentiment", "input": [1.5]}, "input"),
        ("/pooling", {"model": "sentiment", "input": "a", "encoding_format": "hex"}, None),
    ],
)
def test_what_a_classifier_does_not_serve_is_a_400(
    server: ServerProcess, path: str, body: dict, field
) -> None:
    response = httpx.post(f"{server.base_url}{path}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] and (field is None or error["param"] == field)
    if path == "/v1/completions":
        assert "sequence classifier" in error["message"]


def test_errors_outside_the_routes_come_in_openais_shape(server: ServerProcess) -> None:
    """A wrong model is a 404, a wrong method a 405, both in OpenAI's error shape (vLLM's routes
    outside /v1/ are OpenAI's too)."""
    response = httpx.post(f"{server.base_url}/classify", json={"model": "other", "input": "a"}, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["message"]
    for path in ("/classify", "/pooling", "/v2/rerank"):
        response = httpx.get(f"{server.base_url}{path}", timeout=30)
        assert response.status_code == 405 and response.json()["error"]["type"] == "invalid_request_error"


def _cross_encoder(source: Path, folder: Path) -> Path:
    """A copy of the 1-label classifier ``source`` whose tokenizer joins a pair as a reranker's
    does, the two texts around a separator: ``$A <sep> $B`` (one text alone stays as it is)."""
    shutil.copytree(source, folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    separator = "<|system|>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A",
        pair=f"$A {separator} $B:1",
        special_tokens=[(separator, tokenizer.token_to_id(separator))],
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def _sigmoid(value: float) -> float:
    return 1 / (1 + math.exp(-value))


def test_a_cross_encoder_scores_each_pair_as_one_input(tiny_model_factory, tmp_path) -> None:
    """``LLM.score`` with a classifier of one label: the sigmoid of transformers' logit for the
    pair as transformers' tokenizer joins it (``text_pair``), one text against many or pair by pair."""
    folder = _cross_encoder(tiny_model_factory("qwen3-reward"), tmp_path / "m")
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    llm = LLM(folder, kv_cache_memory="4MiB")
    query, documents = "who kills Tybalt", ["ROMEO: Tybalt, the reason", "the rest is silence", "a"]
    joined = [their_tokenizer(query, document)["input_ids"] for document in documents]
    assert [llm.tokenizer.encode_pair(query, document) for document in documents] == joined
    assert joined[0] != llm.tokenizer.encode(query) + llm.tokenizer.encode(documents[0])  # the separator
    expected = [_sigmoid(logits[0]) for logits in _their_logits(folder, joined)]
    assert llm.score(query, documents) == pytest.approx(expected, abs=1e-5)
    logits = [row[0] for row in _their_logits(folder, joined)]
    assert llm.score(query, documents, use_activation=False) == pytest.approx(logits, abs=1e-5)
    pairwise = llm.score([query, documents[1]], [documents[2], query])
    swapped = [
        their_tokenizer(query, documents[2])["input_ids"],
        their_tokenizer(documents[1], query)["input_ids"],
    ]
    assert pairwise == pytest.approx([_sigmoid(row[0]) for row in _their_logits(folder, swapped)], abs=1e-5)
    with pytest.raises(PairingError, match="text_1 has 2 texts and text_2 3"):
        llm.score([query, query], documents)
    with pytest.raises(ValueError, match="classifier of 3 labels: a score comes from an embedding model"):
        LLM(tiny_model_factory("llama-classifier"), kv_cache_memory="4MiB").score("a", "b")


def test_an_embedding_models_score_is_the_cosine_of_the_embeddings(tiny_model_factory) -> None:
    llm = LLM(tiny_model_factory("qwen3"), kv_cache_memory="4MiB")
    texts = ["ROMEO: good night", "the rest is silence", "JULIET: good night"]
    vectors = [np.asarray(vector) for vector in llm.embed(texts)]
    assert llm.score(texts[0], texts[1:]) == pytest.approx(
        [float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])], abs=1e-6
    )
    assert llm.score(texts[:2], texts[1:]) == pytest.approx(
        [float(vectors[0] @ vectors[1]), float(vectors[1] @ vectors[2])], abs=1e-6
    )
    with pytest.raises(PairingError, match="must not be empty lists"):
        llm.score([], texts)


@pytest.fixture(scope="module")
def cross_encoder_server(tiny_model_factory, tmp_path_factory) -> Iterator[tuple[ServerProcess, Path]]:
    folder = _cross_encoder(tiny_model_factory("qwen3-reward"), tmp_path_factory.mktemp("rerank") / "m")
    with run_server(folder, "--kv-cache-memory", "8MiB", "--served-model-name", "reranker") as process:
        yield process, folder


def test_score_and_rerank_by_a_cross_encoder(cross_encoder_server) -> None:
    server, folder = cross_encoder_server
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    query, documents = "who kills Tybalt", ["the rest is silence", "ROMEO: Tybalt, the reason", "a"]
    joined = [their_tokenizer(query, document)["input_ids"] for document in documents]
    expected = [_sigmoid(logits[0]) for logits in _their_logits(folder, joined)]
    score = httpx.post(
        f"{server.base_url}/v1/score",
        json={"model": "reranker", "text_1": query, "text_2": documents},
        timeout=30,
    )
    assert score.status_code == 200, score.text
    body = score.json()
    assert [item["score"] for item in body["data"]] == pytest.approx(expected, abs=1e-5)
    assert body["usage"]["prompt_tokens"] == sum(len(ids) for ids in joined)
    rerank = httpx.post(
        f"{server.base_url}/v1/rerank", json={"query": query, "documents": documents, "top_n": 2}, timeout=30
    ).json()
    ranked = sorted(range(3), key=lambda i: -expected[i])[:2]
    assert [result["index"] for result in rerank["results"]] == ranked
    assert [result["relevance_score"] for result in rerank["results"]] == pytest.approx(
        [expected[i] for i in ranked], abs=1e-5
    )
    assert rerank["results"][0]["document"] == {"text": documents[ranked[0]]}
    # use_activation false: the logits themselves, ranked the same.
    body = {"text_1": query, "text_2": documents, "use_activation": False}
    raw = httpx.post(f"{server.base_url}/v1/score", json=body, timeout=30).json()
    assert [item["score"] for item in raw["data"]] == pytest.approx(
        [row[0] for row in _their_logits(folder, joined)], abs=1e-5
    )
    # The joined tokens' last 4, as vLLM's truncate_prompt_tokens keeps them.
    truncated = httpx.post(
        f"{server.base_url}/score",
        json={"text_1": query, "text_2": documents[1], "truncate_prompt_tokens": 4},
        timeout=30,
    ).json()
    (last_four,) = _their_logits(folder, [joined[1][-4:]])
    assert truncated["data"][0]["score"] == pytest.approx(_sigmoid(last_four[0]), abs=1e-5)
    # A document too long for the context: refused, unless truncated, where its end is read (it
    # was refused either way).
    long_document = "ROMEO: Tybalt, the reason " * 4000
    long_body = {"text_1": query, "text_2": long_document}
    refused = httpx.post(f"{server.base_url}/score", json=long_body, timeout=60)
    assert refused.status_code == 400 and "characters long" in refused.text
    cut = httpx.post(f"{server.base_url}/score", json={**long_body, "truncate_prompt_tokens": 4}, timeout=60)
    assert cut.status_code == 200, cut.text
    (their_end,) = _their_logits(folder, [their_tokenizer(query, long_document)["input_ids"][-4:]])
    assert cut.json()["data"][0]["score"] == pytest.approx(_sigmoid(their_end[0]), abs=1e-5)
    for bad, field in (
        ({"text_1": "", "text_2": "a"}, "text_1"),
        ({"text_1": ["a", "b"], "text_2": ["c"]}, "text_2"),
        ({"text_1": "a", "text_2": "\ud800"}, "text_2"),  # a lone surrogate: no Unicode text
    ):
        # Sent as escaped JSON text: a lone surrogate has no UTF-8 form of its own.
        response = httpx.post(f"{server.base_url}/v1/score", content=json.dumps(bad),
                              headers={"Content-Type": "application/json"}, timeout=30)  # fmt: skip
        assert response.status_code == 400 and response.json()["error"]["param"] == field


def _their_last_logits(folder: Path, prompts: list[list[int]]) -> torch.Tensor:
    """transformers' causal LM's logits at each prompt's last token, [prompts, vocabulary]."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return torch.stack([model(torch.tensor([ids])).logits[0, -1] for ids in prompts])


# Qwen3-Reranker's overrides, vLLM's spelling, with two tokens of the tiny tokenizer as "no" and "yes".
_RERANKER = {"classifier_from_token": ["e", "Ġno"], "is_original_qwen3_reranker": True}


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])  # the LM head its own, and tied to the embeddings
def test_an_llm_reranker_serves_as_a_cross_encoder_through_hf_overrides(
    tiny_model_factory, arch: str
) -> None:
    """Qwen3-Reranker's way: a causal LM that answers "yes" or "no", its score the probability of
    "yes" against "no" at the prompt's last token, as transformers' LM gives the two logits."""
    folder = tiny_model_factory(arch)
    architecture = {"qwen3": "Qwen3ForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification"}[
        arch
    ]
    overrides = {"architectures": [architecture], **_RERANKER}
    llm = LLM(folder, kv_cache_memory="4MiB", hf_overrides=json.dumps(overrides))
    cfg = llm.engine.config.model
    assert cfg.labels == ("Ġno",) and cfg.head_from_tokens is not None
    assert cfg.head_from_tokens.tied == (arch == "qwen2")
    prompts = _prompts(cfg.vocab_size)
    logits = _their_last_logits(folder, prompts)
    no, yes = llm.tokenizer.encode("e")[0], 291
    expected = torch.softmax(logits[:, [no, yes]], dim=-1)[:, 1].tolist()
    assert [output.probs[0] for output in llm.classify(prompts)] == pytest.approx(expected, abs=1e-5)
    # Its score of a pair: the two texts read as one text (vLLM's join for an LLM reranker).
    joined = llm.tokenizer.encode("who kills Tybalt" + "ROMEO")
    assert llm.score("who kills Tybalt", "ROMEO") == pytest.approx([llm.classify([joined])[0].probs[0]])


def test_an_llm_rerankers_tokens_come_from_the_tokenizer_folder(tiny_model_factory, tmp_path) -> None:
    """With --tokenizer, the head's tokens are looked up in that folder's tokenizer: the same head
    as the folder that holds both."""
    folder = tiny_model_factory("qwen3")
    overrides = {"architectures": ["Qwen3ForSequenceClassification"], **_RERANKER}
    weights, tokenizer = split_tokenizer(folder, tmp_path)
    whole = LLM(folder, kv_cache_memory="4MiB", hf_overrides=overrides)
    split = LLM(weights, kv_cache_memory="4MiB", hf_overrides=overrides, tokenizer=str(tokenizer))
    prompts = _prompts(whole.engine.config.model.vocab_size)
    expected = [output.probs[0] for output in whole.classify(prompts)]
    assert [output.probs[0] for output in split.classify(prompts)] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("use_pad_token", [False, True])
def test_an_llm_rerankers_pair_is_one_text_unless_use_pad_token(
    tiny_model_factory, tmp_path, use_pad_token
) -> None:
    """A tokenizer whose pair template puts a separator between the texts (Gemma's and Llama's put
    a second BOS): an LLM reranker reads the pair as one text, without it, as vLLM does, unless
    ``use_pad_token`` asks for the template (a cross-encoder's join)."""
    folder = _cross_encoder(tiny_model_factory("qwen3"), tmp_path / "m")
    overrides = {
        "architectures": ["Qwen3ForSequenceClassification"],
        **_RERANKER,
        "use_pad_token": use_pad_token,
    }
    llm = LLM(folder, kv_cache_memory="4MiB", hf_overrides=overrides)
    first, second = "who kills Tybalt", "ROMEO"
    joined = (
        llm.tokenizer.encode_pair(first, second) if use_pad_token else llm.tokenizer.encode(first + second)
    )
    assert len(llm.tokenizer.encode_pair(first, second)) > len(llm.tokenizer.encode(first + second))
    assert llm.score(first, second) == pytest.approx([llm.classify([joined])[0].probs[0]], abs=1e-6)


def test_a_head_of_several_tokens_gives_each_tokens_logit(tiny_model_factory) -> None:
    """vLLM's no_post_processing (bge-reranker-v2-gemma's way, one token): the labels are the
    tokens, their logits the LM's for them (Gemma: tied embeddings, its hidden state scaled)."""
    folder = tiny_model_factory("gemma")
    overrides = {"architectures": ["GemmaForSequenceClassification"], "classifier_from_token": ["t", "e"],
                 "method": "no_post_processing"}  # fmt: skip
    llm = LLM(folder, kv_cache_memory="4MiB", hf_overrides=overrides)
    assert llm.engine.config.model.labels == ("t", "e")
    prompts = _prompts(llm.engine.config.model.vocab_size)
    expected = _their_last_logits(folder, prompts)[:, [87, 72]]
    ours = torch.tensor([output.logits for output in llm.classify(prompts)])
    assert (ours - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"classifier_from_token": ["e", "t"], "method": "from_2_way_softmax"},
            "one of the served classifiers",
        ),
        (
            {
                "architectures": ["Qwen3ForSequenceClassification"],
                "classifier_from_token": ["e", "e"],
                "method": "from_2_way_softmax",
            },
            "names a token twice",
        ),
        (
            {"architectures": ["Qwen3ForSequenceClassification"], "method": "no_post_processing"},
            "needs classifier_from",
        ),
        (
            {
                "architectures": ["Qwen3ForSequenceClassification"],
                "classifier_from_token": ["e"],
                "method": "from_2_way_softmax",
            },
            "takes two tokens",
        ),  # fmt: skip
        (
            {"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["e", "t"]},
            "method must be from_2_way_softmax or no_post_processing, got None",
        ),  # fmt: skip
        (
            {
                "architectures": ["Qwen3ForSequenceClassification"],
                "classifier_from_token": "e",
                "method": "no_post_processing",
            },
            "must be a non-empty list",
        ),  # fmt: skip
        (
            {
                "architectures": ["Qwen3ForSequenceClassification"],
                "classifier_from_token": ["e", "zzz"],
                "method": "no_post_processing",
            },
            "classifier_from_token 'zzz' is not a token",
        ),  # fmt: skip
    ],
)
def test_heads_from_tokens_that_cannot_be_made_are_refused(tiny_model_factory, overrides, message) -> None:
    with pytest.raises((ModelLoadError, ValueError), match=message):
        LLM(tiny_model_factory("qwen3"), kv_cache_memory="4MiB", hf_overrides=overrides)


def test_hf_overrides_must_be_a_json_object(tiny_model_factory) -> None:
    for value, message in (("{nope", "hf_overrides is not JSON"), ("[1]", "must be a JSON object")):
        with pytest.raises(ValueError, match=message):
            LLM(tiny_model_factory("qwen3"), kv_cache_memory="4MiB", hf_overrides=value)
