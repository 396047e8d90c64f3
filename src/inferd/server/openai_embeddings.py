"""OpenAI `POST /v1/embeddings`, served by the repository's `sentence_embedding` models and by the
served LLM (``server/openai/llm_embeddings.py``), by the request's ``model``.

For a repository model each input string is one v2 request to it, so they go through its dynamic
batcher.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from inferd.server.errors import InvalidRequestError, ServiceUnavailableError, protocol_route_class
from inferd.server.errors import ModelNotFoundError as ModelNotFoundApiError
from inferd.server.frontend import TIMEOUT_HEADER, Frontend
from inferd.server.openai import llm_embeddings
from inferd.server.openai.common import encode_vector, error_response
from inferd.server.streaming import unless_disconnected
from inferd.serving.dataplane import DataPlane
from inferd.serving.errors import InferenceError, InvalidInputError, ModelNotFoundError, ModelNotReadyError
from inferd.serving.repository import ModelRepository
from inferd.serving.tensor import InferRequest, RequestedOutput, Tensor

EMBEDDING_RUNTIME = "sentence_embedding"


def _error_response(exc: InferenceError) -> Response:
    """A v2 model's error in the shape the OpenAI routes give the same kind of error."""
    if isinstance(exc, ModelNotFoundError):
        return error_response(ModelNotFoundApiError(str(exc), "model"))
    if isinstance(exc, ModelNotReadyError):
        return error_response(ServiceUnavailableError(str(exc)))
    return error_response(InvalidRequestError(str(exc)))


def _parse_form(body: Any) -> tuple[str | None, str, int | None]:
    """The fields every embeddings request has: its model (None: not given), encoding and
    dimensions."""
    if not isinstance(body, dict):
        raise InvalidInputError("request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidInputError("'model' must be a string")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise InvalidInputError("'encoding_format' must be 'float' or 'base64'")
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise InvalidInputError(f"'dimensions' must be a positive integer, got {dimensions!r}")
    return model, encoding, dimensions


def _texts(body: dict[str, Any]) -> list[str]:
    """A repository model's inputs: strings."""
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, list) and texts and all(isinstance(t, int) for t in texts):
        raise InvalidInputError("'input' as token ids is not supported: send the text")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidInputError("'input' must be a string or a non-empty list of strings")
    if not all(texts):  # as OpenAI: an empty string has nothing to embed
        raise InvalidInputError("'input' must not contain empty strings")
    return texts


def _check_width(model: str, dimensions: int, width: int) -> None:
    if dimensions != width:
        # Shortening is only meaningful for models trained for it; this one gives its own width.
        raise InvalidInputError(f"'dimensions': model {model!r} gives {width}-dimensional embeddings")


def _check_served_options(body: dict[str, Any], model: str, normalized: bool) -> None:
    """vLLM's request options a repository's encoder cannot follow, refused rather than ignored:
    ``normalize`` other than what the model's ``normalize`` parameter (default true) makes, a
    ``priority`` (its batcher serves in arrival order), ``add_special_tokens`` false (its
    tokenizer adds them)."""
    normalize = body.get("normalize")
    if normalize is not None and normalize is not normalized:
        made = "L2-normalized" if normalized else "unnormalized"
        raise InvalidInputError(f"'normalize': model {model!r} gives {made} embeddings")
    if body.get("priority") not in (None, 0):
        raise InvalidInputError(f"'priority': model {model!r} serves requests in arrival order")
    if body.get("add_special_tokens") not in (None, True):
        raise InvalidInputError(f"'add_special_tokens': model {model!r}'s tokenizer always adds them")


class _EmbeddingService:
    def __init__(self, repository: ModelRepository) -> None:
        self._repository = repository
        self._plane = DataPlane(repository)

    def _input_name(self, body: dict[str, Any], model: str, dimensions: int | None) -> str:
        """The model's text input; a ``dimensions`` the model's width rules out (its ``embedding``
        output's declared width, or, left open, its encoder's) is refused here, before any text is
        embedded."""
        entry = self._repository.get(model)
        config = entry.require_ready()
        if config.runtime != EMBEDDING_RUNTIME:
            raise InvalidInputError(f"model {model!r} is not an embedding model")
        _check_served_options(body, model, normalized=bool(config.parameters.get("normalize", True)))
        declared = next((o.shape[-1] for o in config.outputs if o.name == "embedding" and o.shape), -1)
        width = declared if declared > 0 else getattr(entry.runtime, "embedding_width", None)
        if dimensions is not None and width is not None:
            _check_width(model, dimensions, width)
        return config.inputs[0].name

    async def _embed_one(self, model: str, input_name: str, text: str) -> tuple[np.ndarray, int]:
        data = np.array([[text.encode("utf-8")]], dtype=object)
        request = InferRequest(
            inputs=[Tensor(input_name, "BYTES", data)],
            outputs=[RequestedOutput("embedding"), RequestedOutput("token_count")],
        )
        response = await self._plane.infer(model, None, request)
        outputs = {tensor.name: tensor.data for tensor in response.outputs}
        return outputs["embedding"][0], int(outputs["token_count"].reshape(-1)[0])

    async def embed(
        self, body: dict[str, Any], model: str, encoding: str, dimensions: int | None
    ) -> dict[str, Any]:
        texts = _texts(body)
        input_name = self._input_name(body, model, dimensions)
        results = await asyncio.gather(*(self._embed_one(model, input_name, text) for text in texts))
        if dimensions is not None:  # an encoder that does not name its width: known only now
            _check_width(model, dimensions, len(results[0][0]))
        tokens = sum(count for _, count in results)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": index, "embedding": encode_vector(vector, encoding)}
                for index, (vector, _) in enumerate(results)
            ],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def build_embeddings_router(
    repository: ModelRepository | None,
    dependencies: Sequence[Callable[..., Any]] = (),
    served_llm: Frontend | None = None,
) -> APIRouter:
    """The route over ``repository``'s embedding models and ``served_llm`` (either may be None)."""
    service = _EmbeddingService(repository) if repository is not None else None
    router = APIRouter(
        route_class=protocol_route_class(error_response),
        dependencies=[Depends(dependency) for dependency in dependencies],
    )

    @router.post("/v1/embeddings")
    async def create_embeddings(request: Request) -> Response:
        sent = await request.body()  # outside the try: a failure to read it is no client's JSON
        try:
            body = json.loads(sent)
        # ValueError: bad JSON or UTF-8, or an integer past Python's 4,300-digit limit; nesting: recursion
        except (ValueError, RecursionError) as exc:
            return error_response(InvalidRequestError(f"request body is not valid JSON: {exc}"))
        try:
            model, encoding, dimensions = _parse_form(body)
            if model is None:
                # As vLLM: a request without a model is the served LLM's.
                if served_llm is None:
                    raise InvalidInputError("'model' must name one of this server's embedding models")
                model = served_llm.model_name
                body = {**body, "model": model}
            if served_llm is not None and llm_embeddings.serves(served_llm, model):
                timeout = body.get("timeout")
                timeout_s = served_llm.timeout_s(request.headers.get(TIMEOUT_HEADER), timeout)
                embed = llm_embeddings.embed_with_llm(served_llm, body, encoding, dimensions, timeout_s)
                # A client that leaves aborts its inputs' engine requests, as on every route.
                return JSONResponse(await unless_disconnected(request, embed))
            if service is None:
                raise ModelNotFoundError(f"model {model!r} is not served")
            return JSONResponse(await service.embed(body, model, encoding, dimensions))
        except InferenceError as exc:
            return _error_response(exc)

    return router
