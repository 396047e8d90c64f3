"""OpenAI `POST /v1/embeddings` answered by the served LLM (or one of its LoRA adapters): each
input's last token's final hidden state, L2-normalized (``SamplingParams.embed``; the pooling of
decoder embedding models such as Qwen3-Embedding, as vLLM's embed task pools them)."""

from __future__ import annotations

from contextlib import aclosing
from typing import Any

import numpy as np

from inferd.engine.matryoshka import check_dimensions, shortened
from inferd.engine.outputs import RequestOutput
from inferd.sampling_params import SamplingParams
from inferd.server.errors import GenerationError, InvalidRequestError, RequestTimeoutError
from inferd.server.frontend import Frontend
from inferd.server.openai.common import encode_vector
from inferd.server.openai.pooling_chat import chat_input, read_chat_fields


def serves(frontend: Frontend, model: Any) -> bool:
    """Whether ``model`` names the served LLM (by any of its names) or one of its adapters."""
    return isinstance(model, str) and (
        model == frontend.model_name or model in frontend.aliases or model in frontend.adapters
    )


def parse_inputs(value: Any) -> list[str | list[int]]:
    """OpenAI's ``input``: a string, a list of strings, a list of token ids or a list of those."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(_is_token(t) for t in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(
            "input: must be a string, token ids, or a non-empty list of either", "input"
        )
    if len({isinstance(item, str) for item in value}) > 1:  # as OpenAI's schema: one form per request
        raise InvalidRequestError("input: a list must hold only strings or only token-id lists", "input")
    for item in value:
        text = isinstance(item, str)
        if not (text or isinstance(item, list) and all(_is_token(t) for t in item)):
            raise InvalidRequestError("input: each item must be a string or a list of token ids", "input")
        if not item:  # as OpenAI: an empty input has nothing to embed
            raise InvalidRequestError("input: must not contain empty strings or empty token lists", "input")
    return value


def truncation(value: Any) -> int | None:
    """vLLM's ``truncate_prompt_tokens`` as a request gives it: None, -1 or a positive count."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value == 0 or value < -1:
        raise InvalidRequestError(
            f"truncate_prompt_tokens: must be -1 or a positive integer, got {value!r}",
            "truncate_prompt_tokens",
        )
    return value


def check_normalize(value: Any, normalized: bool) -> None:
    """vLLM's ``normalize`` as a request gives it: taken where it says what the output is
    (``normalized``: an L2-normalized embedding), refused where it asks for the other."""
    if value is None:
        return
    if not isinstance(value, bool):
        raise InvalidRequestError(f"normalize: must be true or false, got {value!r}", "normalize")
    if value != normalized:
        what = "L2-normalized embeddings" if normalized else "raw outputs, not normalized"
        raise InvalidRequestError(f"normalize: this model gives {what}; {value} is not served", "normalize")


def _option(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) is not (kind is bool) or not isinstance(value, kind):
        raise InvalidRequestError(
            f"{name}: must be {'true or false' if kind is bool else 'an integer'}", name
        )
    return value


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


async def embed_prompts(
    frontend: Frontend,
    model: str | None,
    prompts: list[str | list[int]],
    field: str,
    timeout_s: float | None,
    classifier_logits: bool = False,
    truncate_prompt_tokens: int | None = None,
    priority: int = 0,
    add_special_tokens: bool = True,
) -> tuple[list[np.ndarray], int]:
    """Each prompt's embedding (float32) by the served model or the adapter ``model`` names, and
    the prompt tokens embedded; ``field`` names the prompts in errors. After ``timeout_s`` the
    unfinished ones end the request with a 408. A sequence classifier's pooled outputs are its
    label logits, not embeddings: taken only where ``classifier_logits`` says the caller wants
    them. ``truncate_prompt_tokens`` (vLLM's): each prompt's last so many tokens (-1: as many as
    the context holds). ``priority`` and ``add_special_tokens`` as vLLM's request fields."""
    if frontend.llm.config.model.labels and not classifier_logits:
        raise InvalidRequestError(
            "the model is a sequence classifier: it gives label logits (POST /classify, /pooling), "
            "not embeddings",
            "model",
        )
    adapter = frontend.adapter_for(model)
    params = frontend.sampling_params(
        None, max_tokens=1, temperature=0.0, embed=True, adapter=adapter, priority=priority
    )
    # Before tokenizing: 300,000 inputs took the preparing thread 6-10 s to refuse, and every other
    # request waited behind them.
    frontend.check_fan_out(len(prompts), field=field)
    token_ids = await frontend.off_loop(
        _prompt_token_ids, frontend, prompts, params, field, truncate_prompt_tokens, add_special_tokens
    )
    frontend.check_ready(token_ids, field=field)
    finals: dict[int, RequestOutput] = {}
    request_id = frontend.new_request_id("embd")
    async with aclosing(frontend.generate(request_id, token_ids, params, timeout_s=timeout_s)) as stream:
        async for item in stream:
            if item.output.finished:
                finals[item.index] = item.output
    vectors = []
    for index in range(len(token_ids)):
        out = finals[index]
        if out.finish_reason == "timeout":
            raise RequestTimeoutError(f"the request did not finish within {timeout_s} s")
        if out.embedding is None:
            raise GenerationError(f"{field} {index} was not embedded ({out.finish_reason})")
        vectors.append(np.asarray(out.embedding, dtype=np.float32))
    return vectors, sum(len(ids) for ids in token_ids)


def _prompt_token_ids(
    frontend: Frontend,
    prompts: list[str | list[int]],
    params: SamplingParams,
    field: str,
    truncate_prompt_tokens: int | None,
    add_special_tokens: bool,
) -> list[list[int]]:
    """Each prompt tokenized and checked against the context (as `embed_prompts` says)."""
    if truncate_prompt_tokens is not None:
        # A pooled prompt may fill the whole context (InputProcessor.resolve_max_tokens).
        prompts = [
            frontend.truncated(prompt, truncate_prompt_tokens, 0, field, add_special_tokens)
            for prompt in prompts
        ]
    return [frontend.prepare(prompt, params, field, add_special_tokens) for prompt in prompts]


async def embed_with_llm(
    frontend: Frontend, body: dict[str, Any], encoding: str, dimensions: int | None, timeout_s: float | None
) -> dict:
    """The response to an embeddings request whose ``model`` the served LLM answers
    (``encoding`` and ``dimensions`` already checked for their form); after ``timeout_s`` its
    unfinished inputs end it with a 408."""
    model = body["model"]
    if dimensions is not None and not frontend.llm.config.model.labels:  # a classifier is refused below
        # Shortening is only meaningful for models trained for it (engine/matryoshka.py).
        try:
            check_dimensions(frontend.llm.config.model, dimensions)
        except ValueError as exc:
            raise InvalidRequestError(f"dimensions: {exc}", "dimensions") from None
    check_normalize(body.get("normalize"), normalized=not frontend.llm.config.model.labels)
    keep = truncation(body.get("truncate_prompt_tokens"))
    fields = read_chat_fields(body)
    chat = await frontend.off_loop(chat_input, frontend, fields, body.get("input") is not None)
    prompts: list[str | list[int]] = [chat] if chat is not None else parse_inputs(body.get("input"))
    field = "messages" if chat is not None else "input"
    vectors, tokens = await embed_prompts(
        frontend, model, prompts, field, timeout_s, truncate_prompt_tokens=keep,
        priority=_option(body, "priority", int, 0),
        add_special_tokens=_option(body, "add_special_tokens", bool, True),
    )  # fmt: skip
    if dimensions is not None:
        vectors = [np.asarray(shortened(vector.tolist(), dimensions), dtype=np.float32) for vector in vectors]
    data = [
        {"object": "embedding", "index": index, "embedding": encode_vector(vector, encoding)}
        for index, vector in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
