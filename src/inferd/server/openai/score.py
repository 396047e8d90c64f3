"""vLLM's score and rerank APIs over the served model (``engine/scoring.py`` says how a pair is
scored): an embedding model's cosine similarity of the two texts' last-token embeddings
(``llm_embeddings.py``), or a cross-encoder's (a classifier of one label) sigmoid of its logit for
the two texts read as one pair.

- ``POST /v1/score`` (and ``/score``): ``text_1`` and ``text_2``, each a string or a list of them;
  one ``text_1`` is scored against every ``text_2``, two lists of one length pair by pair.
- ``POST /v1/rerank`` (and ``/rerank``, ``/v2/rerank``; Jina's and Cohere's shape): a ``query``
  and its ``documents``, answered as the documents by falling score, the first ``top_n``.

An embedding model embeds each distinct text of a list once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from inferd.engine.outputs import ClassificationOutput
from inferd.engine.scoring import PairingError, check_scoring_labels, joined_pair, pair_indices
from inferd.engine.tokenizer import InvalidTextError, check_unicode
from inferd.server.errors import GenerationError, InvalidRequestError
from inferd.server.frontend import TIMEOUT_HEADER, Frontend
from inferd.server.openai.common import ActivationOption
from inferd.server.openai.llm_embeddings import embed_prompts, truncation
from inferd.server.streaming import unless_disconnected


class ScoreRequest(ActivationOption):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    timeout: float | None = None
    # vLLM's: each text's last so many tokens (-1: as many as the context holds).
    truncate_prompt_tokens: StrictInt | None = None
    priority: StrictInt = 0


class _Document(BaseModel):
    text: str


class RerankRequest(ActivationOption):
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
    priority: StrictInt = 0


def _pairs(text_1: str | list[str], text_2: str | list[str]) -> list[tuple[int, int]]:
    try:
        return pair_indices(len(_as_list(text_1)), len(_as_list(text_2)))
    except PairingError as exc:
        raise InvalidRequestError(str(exc), exc.field) from None


@dataclass(frozen=True)
class _ScoreJob:
    """One score or rerank request's pairs: ``firsts`` and ``seconds`` are each a field name and
    its texts, ``pairs`` the (first, second) indices scored, ``keep`` vLLM's truncation."""

    model: str | None
    firsts: tuple[str, list[str]]
    seconds: tuple[str, list[str]]
    pairs: list[tuple[int, int]]
    timeout_s: float | None
    keep: int | None
    # A cross-encoder's score: its logit's sigmoid, or with vLLM's use_activation false the logit.
    activation: bool = True
    priority: int = 0


async def _embedded(
    frontend: Frontend, job: _ScoreJob, texts: tuple[str, list[str]], timeout_s: float | None
) -> tuple[list[np.ndarray], int]:
    """Each of ``texts``' embedding (a field name and its texts; each distinct text embedded once,
    its last ``job.keep`` tokens where given), and the prompt tokens embedded."""
    field, strings = texts
    if not all(strings):
        raise InvalidRequestError("texts must not be empty", field)
    distinct = list(dict.fromkeys(strings))
    vectors, tokens = await embed_prompts(
        frontend, job.model, list(distinct), field, timeout_s, truncate_prompt_tokens=job.keep,
        priority=job.priority,
    )  # fmt: skip
    by_text = dict(zip(distinct, vectors, strict=True))
    return [by_text[text] for text in strings], tokens


async def _cosines(frontend: Frontend, job: _ScoreJob) -> tuple[list[float], int]:
    """Each pair's cosine similarity (the embeddings are normalized), and the prompt tokens
    embedded."""
    start = time.monotonic()
    left, left_tokens = await _embedded(frontend, job, job.firsts, job.timeout_s)
    # The second list has what the first left of the request's time.
    remaining = None if job.timeout_s is None else max(job.timeout_s - (time.monotonic() - start), 1e-3)
    right, right_tokens = await _embedded(frontend, job, job.seconds, remaining)
    return [float(np.dot(left[i], right[j])) for i, j in job.pairs], left_tokens + right_tokens


async def _cross_encoded(frontend: Frontend, job: _ScoreJob) -> tuple[list[float], int]:
    """Each pair's score by a cross-encoder: the sigmoid of the classifier's one logit for the two
    texts joined by the tokenizer's pair template (the joined tokens' last ``keep`` where given),
    and the prompt tokens read."""
    (first_field, first_texts), (_, second_texts) = job.firsts, job.seconds
    for field, texts in (job.firsts, job.seconds):
        if not all(texts):
            raise InvalidRequestError("texts must not be empty", field)
        for text in texts:  # checked apart, so an error names the field at fault
            try:
                check_unicode(text)
            except InvalidTextError as exc:
                raise InvalidRequestError(str(exc), field) from None
    model = frontend.llm.config.model
    tokenizer = frontend.tokenizer
    joined: list[str | list[int]] = await frontend.off_loop(
        lambda: [
            joined_pair(tokenizer, model, first_texts[i], second_texts[j], cut_to_fit=job.keep is not None)
            for i, j in job.pairs
        ]
    )
    logits, tokens = await embed_prompts(
        frontend, job.model, joined, first_field, job.timeout_s, classifier_logits=True,
        truncate_prompt_tokens=job.keep, priority=job.priority,
    )  # fmt: skip
    try:
        verdicts = [ClassificationOutput.from_logits(row.tolist(), model.labels) for row in logits]
        return [v.probs[0] if job.activation else v.logits[0] for v in verdicts], tokens
    except ValueError as exc:  # non-finite logits: the model's fault, not the request's
        raise GenerationError(str(exc)) from None


async def _scores(frontend: Frontend, job: _ScoreJob) -> tuple[list[float], int]:
    """Each pair's score as the served model gives one (``engine/scoring.py``)."""
    labels = frontend.llm.config.model.labels
    try:
        check_scoring_labels(labels)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), "model") from None
    return await (_cross_encoded if labels else _cosines)(frontend, job)


def _as_list(texts: str | list[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else texts


def add_score_routes(router: APIRouter, frontend: Frontend) -> None:
    async def score(body: ScoreRequest, request: Request) -> dict[str, Any]:
        frontend.check_model(body.model)
        timeout_s = frontend.timeout_s(request.headers.get(TIMEOUT_HEADER), body.timeout)
        pairs = _pairs(body.text_1, body.text_2)
        firsts, seconds = ("text_1", _as_list(body.text_1)), ("text_2", _as_list(body.text_2))
        keep = truncation(body.truncate_prompt_tokens)
        job = _ScoreJob(
            body.model, firsts, seconds, pairs, timeout_s, keep, body.applies_activation, body.priority
        )
        run = _scores(frontend, job)
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
        job = _ScoreJob(
            body.model, ("query", [body.query]), ("documents", documents), pairs, timeout_s, keep,
            body.applies_activation, body.priority,
        )  # fmt: skip
        run = _scores(frontend, job)
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
