"""vLLM's classify and pooling APIs over the served model's pooled prompts (``llm_embeddings.py``).

- ``POST /classify`` (and ``/v1/classify``): a sequence classifier's verdict on each ``input``
  (a string, token ids, or a list of either): its likeliest ``label``, the labels' ``probs``
  (softmax, or a single label's sigmoid) and ``num_classes``.
- ``POST /pooling``: each input's pooled output as it is, under ``data``: a classifier's raw label
  logits, or a causal LM's last-token embedding (L2-normalized); ``encoding_format`` ``float`` or
  ``base64`` as for embeddings.

Both take vLLM's ``truncate_prompt_tokens``, as ``/v1/embeddings``, score and rerank do.

A prompt is pooled at its last token, as vLLM pools it (transformers' classifiers read the last
token that is not the pad token, which differs where a prompt ends in it).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import ConfigDict, StrictBool, StrictInt

from inferd.engine.outputs import ClassificationOutput
from inferd.server.errors import GenerationError, InvalidRequestError
from inferd.server.frontend import TIMEOUT_HEADER, Frontend
from inferd.server.openai.common import ActivationOption, encode_vector
from inferd.server.openai.llm_embeddings import check_normalize, embed_prompts, parse_inputs, truncation
from inferd.server.openai.pooling_chat import PoolingChatFields, chat_input
from inferd.server.streaming import unless_disconnected


class PoolingRequest(ActivationOption, PoolingChatFields):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: Any = None
    timeout: float | None = None
    encoding_format: Literal["float", "base64"] = "float"
    # vLLM's: each input's last so many tokens (-1: as many as the context holds).
    truncate_prompt_tokens: StrictInt | None = None
    priority: StrictInt = 0
    add_special_tokens: StrictBool = True
    # vLLM's pooling options: /pooling gives each output whole, as the model pools it, so only what
    # that is is taken (``dimensions`` is /v1/embeddings').
    normalize: StrictBool | None = None
    dimensions: Any = None


def add_classify_routes(router: APIRouter, frontend: Frontend) -> None:
    async def pooled(body: PoolingRequest, request: Request) -> tuple[list[np.ndarray], int]:
        timeout_s = frontend.timeout_s(request.headers.get(TIMEOUT_HEADER), body.timeout)
        keep = truncation(body.truncate_prompt_tokens)
        chat = await frontend.off_loop(chat_input, frontend, body, body.input is not None)
        prompts: list[str | list[int]] = [chat] if chat is not None else parse_inputs(body.input)
        run = embed_prompts(
            frontend,
            body.model,
            prompts,
            "messages" if chat is not None else "input",
            timeout_s,
            classifier_logits=True,
            truncate_prompt_tokens=keep,
            priority=body.priority,
            add_special_tokens=body.add_special_tokens,
        )
        return await unless_disconnected(request, run)

    def response(kind: str, body: PoolingRequest, data: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
        return {
            "id": frontend.new_request_id(kind),
            "object": "list",
            "created": int(time.time()),
            "model": frontend.answering_name(body.model),
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }

    async def classify(body: PoolingRequest, request: Request) -> dict[str, Any]:
        frontend.check_model(body.model)
        labels = frontend.llm.config.model.labels
        if not labels:
            raise InvalidRequestError(
                "the model is not a sequence classifier (no *ForSequenceClassification head)", "model"
            )
        logits, tokens = await pooled(body, request)
        data = []
        for index, vector in enumerate(logits):
            row = vector.tolist()
            try:
                verdict = ClassificationOutput.from_logits(row, labels)
            except ValueError as exc:
                raise GenerationError(f"input {index}: {exc}") from None
            probs = verdict.probs if body.applies_activation else row
            data.append({"index": index, "label": verdict.label, "probs": probs, "num_classes": len(row)})
        return response("classify", body, data, tokens)

    async def pooling(body: PoolingRequest, request: Request) -> dict[str, Any]:
        frontend.check_model(body.model)
        if body.dimensions is not None:
            raise InvalidRequestError(
                "dimensions: /pooling gives each pooled output whole; /v1/embeddings shortens embeddings",
                "dimensions",
            )
        check_normalize(body.normalize, normalized=not frontend.llm.config.model.labels)
        vectors, tokens = await pooled(body, request)
        data = [
            {"index": i, "object": "pooling", "data": encode_vector(vector, body.encoding_format)}
            for i, vector in enumerate(vectors)
        ]
        return response("pool", body, data, tokens)

    for path in ("/classify", "/v1/classify"):
        router.add_api_route(path, classify, methods=["POST"])
    router.add_api_route("/pooling", pooling, methods=["POST"])
