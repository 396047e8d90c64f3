"""vLLM's score and rerank APIs over the served LLM's embeddings (``llm_embeddings.py``): a pair's
score is the cosine similarity of the two texts' last-token embeddings, as vLLM scores with an
embedding model.

- ``POST /v1/score`` (and ``/score``): ``text_1`` and ``text_2``, each a string or a list of them;
  one ``text_1`` is scored against every ``text_2``, two lists of one length pair by pair.
- ``POST /v1/rerank`` (and ``/rerank``, ``/v2/rerank``; Jina's and Cohere's shape): a ``query``
  and its ``documents``, answered as the documents by falling score, the first ``top_n``.

Each distinct text of a list is embedded once.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from inferd.server.errors import InvalidRequestError
from inferd.server.frontend import TIMEOUT_HEADER, Frontend
from inferd.server.openai.llm_embeddings import embed_prompts, truncation
from inferd.server.streaming import unless_disconnected


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    timeout: float | None = None
    # vLLM's: each text's last so many tokens (-1: as many as the context holds).
    truncate_prompt_tokens: StrictInt | None = None


class _Document(BaseModel):
    text: str


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    query: str
    # Strings, or objects with their text (as Cohere's and Jina's clients send them).
    documents: list[str | _Document]
    # The best this many; 0 or none: all (vLLM's default is 0).
    top_n: int | None = Field(default=None, ge=0)
    return_documents: bool = True
    timeout: float | None = None
    truncate_prompt_tokens: StrictInt | None = None


def _pairs(text_1: str | list[str], text_2: str | list[str]) -> list[tuple[int, int]]:
    """Which text of each list each scored pair takes: one ``text_1`` against every ``text_2``,
    or two lists of one length pair by pair."""
    firsts = 1 if isinstance(text_1, str) else len(text_1)
    seconds = 1 if isinstance(text_2, str) else len(text_2)
    if not firsts or not seconds:
        raise InvalidRequestError(
            "text_1 and text_2 must not be empty lists", "text_1" if not firsts else "text_2"
        )
    if firsts == 1:
        return [(0, j) for j in range(seconds)]
    if firsts != seconds:
        raise InvalidRequestError(
            f"text_1 has {firsts} texts and text_2 {seconds}: lists are scored pair by pair, so "
            f"their lengths must match (or text_1 holds one text)",
            "text_2",
        )
    return [(i, i) for i in range(firsts)]


async def _embedded(
    frontend: Frontend,
    model: str | None,
    texts: list[str],
    field: str,
    timeout_s: float | None,
    keep: int | None,
) -> tuple[list[np.ndarray], int]:
    """Each of ``texts``' embedding (each distinct text embedded once, its last ``keep`` tokens
    where given), and the prompt tokens embedded; errors name ``field``."""
    if not all(texts):
        raise InvalidRequestError("texts must not be empty", field)
    distinct = list(dict.fromkeys(texts))
    vectors, tokens = await embed_prompts(
        frontend, model, list(distinct), field, timeout_s, truncate_prompt_tokens=keep
    )
    by_text = dict(zip(distinct, vectors, strict=True))
    return [by_text[text] for text in texts], tokens


async def _cosines(
    frontend: Frontend,
    model: str | None,
    firsts: tuple[str, list[str]],
    seconds: tuple[str, list[str]],
    pairs: list[tuple[int, int]],
    timeout_s: float | None,
    keep: int | None,
) -> tuple[list[float], int]:
    """Each pair's cosine similarity (the embeddings are normalized), and the prompt tokens
    embedded; ``firsts`` and ``seconds`` are each a field name and its texts."""
    (first_field, first_texts), (second_field, second_texts) = firsts, seconds
    start = time.monotonic()
    left, left_tokens = await _embedded(frontend, model, first_texts, first_field, timeout_s, keep)
    # The second list has what the first left of the request's time.
    remaining = None if timeout_s is None else max(timeout_s - (time.monotonic() - start), 1e-3)
    right, right_tokens = await _embedded(frontend, model, second_texts, second_field, remaining, keep)
    return [float(np.dot(left[i], right[j])) for i, j in pairs], left_tokens + right_tokens


def _as_list(texts: str | list[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else texts


def add_score_routes(router: APIRouter, frontend: Frontend) -> None:
    async def score(body: ScoreRequest, request: Request) -> dict[str, Any]:
        frontend.check_model(body.model)
        timeout_s = frontend.timeout_s(request.headers.get(TIMEOUT_HEADER), body.timeout)
        pairs = _pairs(body.text_1, body.text_2)
        firsts, seconds = ("text_1", _as_list(body.text_1)), ("text_2", _as_list(body.text_2))
        keep = truncation(body.truncate_prompt_tokens)
        run = _cosines(frontend, body.model, firsts, seconds, pairs, timeout_s, keep)
        scores, tokens = await unless_disconnected(request, run)
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
        documents = [d if isinstance(d, str) else d.text for d in body.documents]
        if not documents:
            raise InvalidRequestError("documents must not be empty", "documents")
        pairs = [(0, j) for j in range(len(documents))]
        keep = truncation(body.truncate_prompt_tokens)
        run = _cosines(
            frontend, body.model, ("query", [body.query]), ("documents", documents), pairs, timeout_s, keep
        )
        scores, tokens = await unless_disconnected(request, run)
        top_n = body.top_n or len(documents)
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])[:top_n]
        results = []
        for index in ranked:
            result: dict[str, Any] = {"index": index, "relevance_score": scores[index]}
            if body.return_documents:
                result["document"] = {"text": documents[index]}
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
