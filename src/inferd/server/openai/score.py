"""vLLM's score and rerank APIs over the served LLM's embeddings (``llm_embeddings.py``): a pair's
score is the cosine similarity of the two texts' last-token embeddings, as vLLM scores with an
embedding model.

- ``POST /v1/score`` (and ``/score``): ``text_1`` and ``text_2``, each a string or a list of them;
  one ``text_1`` is scored against every ``text_2``, two lists of one length pair by pair.
- ``POST /v1/rerank`` (and ``/rerank``, ``/v2/rerank``; Jina's and Cohere's shape): a ``query``
  and its ``documents``, answered as the documents by falling score, the first ``top_n``.

Each distinct text is embedded once.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from inferd.server.errors import InvalidRequestError
from inferd.server.frontend import TIMEOUT_HEADER, Frontend
from inferd.server.openai.llm_embeddings import embed_prompts
from inferd.server.streaming import unless_disconnected


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    timeout: float | None = None


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    query: str
    documents: list[str]
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = True
    timeout: float | None = None


def _pairs(text_1: str | list[str], text_2: str | list[str]) -> list[tuple[str, str]]:
    firsts = [text_1] if isinstance(text_1, str) else text_1
    seconds = [text_2] if isinstance(text_2, str) else text_2
    if not firsts or not seconds:
        raise InvalidRequestError(
            "text_1 and text_2 must not be empty lists", "text_1" if not firsts else "text_2"
        )
    if len(firsts) == 1:
        return [(firsts[0], second) for second in seconds]
    if len(firsts) != len(seconds):
        raise InvalidRequestError(
            f"text_1 has {len(firsts)} texts and text_2 {len(seconds)}: lists are scored pair by pair, so "
            f"their lengths must match (or text_1 holds one text)",
            "text_2",
        )
    return list(zip(firsts, seconds, strict=True))


async def _scores(
    frontend: Frontend, model: str | None, pairs: list[tuple[str, str]], field: str, timeout_s: float | None
) -> tuple[list[float], int]:
    """Each pair's cosine similarity, and the prompt tokens embedded (each distinct text once)."""
    texts = list(dict.fromkeys(text for pair in pairs for text in pair))
    if not all(texts):
        raise InvalidRequestError("texts must not be empty", field)
    vectors, tokens = await embed_prompts(frontend, model, list(texts), field, timeout_s)
    by_text = dict(zip(texts, vectors, strict=True))
    return [float(np.dot(by_text[first], by_text[second])) for first, second in pairs], tokens


def add_score_routes(router: APIRouter, frontend: Frontend) -> None:
    async def score(body: ScoreRequest, request: Request) -> dict[str, Any]:
        frontend.check_model(body.model)
        timeout_s = frontend.timeout_s(request.headers.get(TIMEOUT_HEADER), body.timeout)
        pairs = _pairs(body.text_1, body.text_2)
        scores, tokens = await unless_disconnected(
            request, _scores(frontend, body.model, pairs, "text_2", timeout_s)
        )
        return {
            "id": frontend.new_request_id("score"),
            "object": "list",
            "created": int(time.time()),
            "model": frontend.answering_name(body.model),
            "data": [{"index": i, "object": "score", "score": value} for i, value in enumerate(scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }

    async def rerank(body: RerankRequest, request: Request) -> dict[str, Any]:
        frontend.check_model(body.model)
        timeout_s = frontend.timeout_s(request.headers.get(TIMEOUT_HEADER), body.timeout)
        if not body.documents:
            raise InvalidRequestError("documents must not be empty", "documents")
        pairs = [(body.query, document) for document in body.documents]
        run = _scores(frontend, body.model, pairs, "documents", timeout_s)
        scores, tokens = await unless_disconnected(request, run)
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.top_n]
        results = []
        for index in ranked:
            result: dict[str, Any] = {"index": index, "relevance_score": scores[index]}
            if body.return_documents:
                result["document"] = {"text": body.documents[index]}
            results.append(result)
        return {
            "id": frontend.new_request_id("rerank"),
            "model": frontend.answering_name(body.model),
            "usage": {"total_tokens": tokens},
            "results": results,
        }

    for path in ("/v1/score", "/score"):
        router.add_api_route(path, score, methods=["POST"])
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        router.add_api_route(path, rerank, methods=["POST"])
