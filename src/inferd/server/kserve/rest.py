"""KServe v2 REST routes (`/v2/...`) over the shared data plane; errors are `{"error": "..."}`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from inferd.server.errors import ApiError, protocol_route_class
from inferd.server.frontend import TIMEOUT_HEADER
from inferd.server.kserve.rest_codec import HEADER_LENGTH, encode_infer_response, parse_infer_request
from inferd.server.streaming import unless_disconnected
from inferd.serving.dataplane import DataPlane, GenerationChunk
from inferd.serving.errors import (
    InferenceError,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    RequestTimedOutError,
    ServerOverloadedError,
)
from inferd.serving.llm_io import STREAM, LLMRequest, llm_request
from inferd.serving.repository import ModelRepository
from inferd.serving.runtimes.base import TextGenerator
from inferd.serving.shared_memory import REGION
from inferd.serving.tensor import InferRequest, Tensor

_STATUS_BY_ERROR: tuple[tuple[type[InferenceError], int], ...] = (
    (InvalidInputError, 400),
    (ModelNotFoundError, 404),
    (ModelNotReadyError, 503),
    (RequestTimedOutError, 408),
    (ServerOverloadedError, 429),
)


_STATUS_BY_API_ERROR_KIND = {
    "invalid_request": 400,
    "authentication": 401,
    "not_found": 404,
    "timeout": 408,
    "too_large": 413,
    "overloaded": 429,
    "unavailable": 503,
}


def error_response(exc: InferenceError) -> JSONResponse:
    status = next((code for kind, code in _STATUS_BY_ERROR if isinstance(exc, kind)), 500)
    response = JSONResponse({"error": str(exc)}, status_code=status)
    if isinstance(exc, ServerOverloadedError):
        response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


def api_error_response(exc: ApiError) -> Response:
    """Errors raised by shared dependencies (the API-key check), in the v2 error shape."""
    return JSONResponse({"error": exc.message}, status_code=_STATUS_BY_API_ERROR_KIND.get(exc.kind, 500))


async def _answer(produce: Callable[[], Awaitable[Response]]) -> Response:
    try:
        return await produce()
    except InferenceError as exc:
        return error_response(exc)


async def _json_body(request: Request) -> dict[str, Any]:
    return _json_object(await request.body())


# A body from this size on is decoded on a worker thread (DataPlane.decoded); a smaller one on the
# loop, where a thread's hand-over would cost more than the work.
DECODE_OFF_LOOP_BYTES = 1 << 20


def decodes_off_loop(sent: bytes) -> bool:
    """Whether a body's decoding goes to a worker thread: a large one, or one naming a shared
    memory region, whose input can be as large however small the body is."""
    return len(sent) >= DECODE_OFF_LOOP_BYTES or REGION.encode() in sent


def _json_object(sent: bytes) -> dict[str, Any]:
    try:
        body = json.loads(sent)
    # ValueError: bad JSON or UTF-8, and an integer past Python's 4,300-digit limit; deep nesting: recursion
    except (ValueError, RecursionError) as exc:
        raise InvalidInputError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidInputError("request body must be a JSON object")
    return body


async def _control_parameters(request: Request) -> dict[str, Any]:
    """The `parameters` of a load or unload request; the body may be empty."""
    if not await request.body():
        return {}
    parameters = (await _json_body(request)).get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInputError("'parameters' must be an object")
    return parameters


def _with_timeout_header(request: Request, parameters: dict[str, Any]) -> dict[str, Any]:
    """The `X-Request-Timeout` header (seconds, as on every protocol's routes) as Triton's `timeout`
    parameter (microseconds), which wins when both are sent: an LLM's generation runs out of time
    with it, a tensor model's request while it waits in the dynamic batcher's queue."""
    header = request.headers.get(TIMEOUT_HEADER)
    if header is None or "timeout" in parameters:
        return parameters
    try:
        seconds = float(header)
    except ValueError:
        raise InvalidInputError(f"{TIMEOUT_HEADER}: must be a number of seconds, got {header!r}") from None
    if not 0 < seconds <= 86400:  # also refuses NaN
        raise InvalidInputError(f"{TIMEOUT_HEADER}: must be in (0, 86400] seconds, got {header!r}")
    return {**parameters, "timeout": max(1, round(seconds * 1e6))}


def _generate_input(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """`text_input` and sampling parameters, from `parameters` or (as Triton allows) top-level fields."""
    text = body.get("text_input")
    if not isinstance(text, str):
        raise InvalidInputError("'text_input' must be a string")
    parameters = {k: v for k, v in body.items() if k not in ("text_input", "parameters", "id")}
    nested = body.get("parameters", {})
    if not isinstance(nested, dict):
        raise InvalidInputError("'parameters' must be an object")
    parameters.update(nested)
    return text, parameters


def build_router(repository: ModelRepository, dependencies: Sequence[Callable[..., Any]] = ()) -> APIRouter:
    """All `/v2` routes for the models of `repository`; `dependencies` (e.g. the API-key check) guard all
    but the health probes, which orchestrators call without credentials."""
    plane = DataPlane(repository)
    health = APIRouter()

    @health.get("/v2/health/live")
    async def server_live() -> Response:
        return JSONResponse({"live": True})

    @health.get("/v2/health/ready")
    async def server_ready() -> Response:
        # A failing status, not only the body, so a Kubernetes readiness probe takes the pod out.
        reason = plane.server_unready_reason()
        if reason is None:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "error": reason}, status_code=503)

    router = APIRouter(
        route_class=protocol_route_class(api_error_response),
        dependencies=[Depends(dependency) for dependency in dependencies],
    )

    @router.get("/v2")
    async def server_metadata() -> Response:
        return JSONResponse(plane.server_metadata())

    @router.post("/v2/repository/index")
    async def repository_index(request: Request) -> Response:
        async def produce() -> Response:
            body = await _json_body(request) if await request.body() else {}
            ready = body.get("ready", False)
            if not isinstance(ready, bool):
                raise InvalidInputError("'ready' must be true or false")
            return JSONResponse(plane.repository_index(ready_only=ready))

        return await _answer(produce)

    @router.post("/v2/repository/models/{name}/load")
    async def load_model(request: Request, name: str) -> Response:
        async def produce() -> Response:
            await plane.load(name, await _control_parameters(request))
            return Response(status_code=200)

        return await _answer(produce)

    @router.post("/v2/repository/models/{name}/unload")
    async def unload_model(request: Request, name: str) -> Response:
        async def produce() -> Response:
            await plane.unload(name, await _control_parameters(request))
            return Response(status_code=200)

        return await _answer(produce)

    # Triton's system shared memory extension (serving/shared_memory.py).
    async def shared_memory_status(region: str | None = None) -> Response:
        return await _answer(lambda: _as_json(plane.shared_memory.status(region)))

    async def register_shared_memory(request: Request, region: str) -> Response:
        async def produce() -> Response:
            body = await _json_body(request)
            regions = plane.shared_memory
            regions.register(region, body.get("key"), body.get("offset", 0), body.get("byte_size"))
            return Response(status_code=200)

        return await _answer(produce)

    async def unregister_shared_memory(region: str | None = None) -> Response:
        async def produce() -> Response:
            plane.shared_memory.unregister(region)
            return Response(status_code=200)

        return await _answer(produce)

    for prefix in ("/v2/systemsharedmemory", "/v2/systemsharedmemory/region/{region}"):
        router.add_api_route(prefix + "/status", shared_memory_status, methods=["GET"])
        router.add_api_route(prefix + "/unregister", unregister_shared_memory, methods=["POST"])
    router.add_api_route(
        "/v2/systemsharedmemory/region/{region}/register", register_shared_memory, methods=["POST"]
    )

    async def model_metadata(name: str, version: str | None = None) -> Response:
        return await _answer(lambda: _as_json(plane.model_metadata(name, version)))

    async def model_config(name: str, version: str | None = None) -> Response:
        return await _answer(lambda: _as_json(plane.model_config(name, version)))

    async def model_statistics(name: str | None = None, version: str | None = None) -> Response:
        return await _answer(lambda: _as_json(plane.model_statistics(name, version)))

    async def model_ready(name: str, version: str | None = None) -> Response:
        async def produce() -> Response:
            entry = repository.get(name, version)
            entry.require_ready()
            return JSONResponse({"name": name, "ready": True})

        return await _answer(produce)

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        async def produce() -> Response:
            sent, sent_length = await request.body(), request.headers.get(HEADER_LENGTH)

            def decode() -> tuple[InferRequest, bool]:
                decoded, binary = parse_infer_request(sent, sent_length, repository.shared_memory)
                decoded.parameters = _with_timeout_header(request, decoded.parameters)
                return decoded, binary

            # A body or a timeout header the codec refuses counts as a failed request.
            infer_request, binary_default = await plane.decoded(name, version, decode, decodes_off_loop(sent))
            if isinstance(repository.get(name, version).runtime, TextGenerator):
                # A client gone stops its generation, as on the other protocols' routes (a tensor
                # model's batch runs to its end for the others in it).
                response = await unless_disconnected(request, plane.infer(name, version, infer_request))
            else:
                response = await plane.infer(name, version, infer_request)
            body, header_length = encode_infer_response(response, infer_request, binary_default)
            if header_length is None:
                return Response(body, media_type="application/json")
            return Response(
                body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)}
            )

        return await _answer(produce)

    async def generate(request: Request, name: str, version: str | None = None) -> Response:
        async def produce() -> Response:
            entry, generator = plane.text_generator(name, version)
            sent = await request.body()  # a body the codec refuses counts as a failed request
            llm = await plane.decoded(
                name, version, lambda: _generate_request(request, sent, stream=False), decodes_off_loop(sent)
            )
            result, stream = await unless_disconnected(request, plane.generate_text(entry, generator, llm))
            outputs = llm.outputs(result.text, stream, result.finish_reason, result.completion_tokens)
            # Always the finish reason; the other extras where asked for.
            payload = {"model_name": entry.name, "model_version": entry.version}
            payload["finish_reason"] = result.finish_reason
            return JSONResponse(payload | _json_fields(outputs))

        return await _answer(produce)

    async def generate_stream(request: Request, name: str, version: str | None = None) -> Response:
        async def produce() -> Response:
            entry, generator = plane.text_generator(name, version)
            sent = await request.body()
            llm = await plane.decoded(
                name, version, lambda: _generate_request(request, sent, stream=True), decodes_off_loop(sent)
            )
            # Validate the sampling fields before the 200 status line goes out.
            chunks = plane.generate_text_stream(entry, generator, llm)
            first = await anext(chunks)
            return StreamingResponse(
                _sse_events(entry.name, entry.version, llm, first, chunks), media_type="text/event-stream"
            )

        return await _answer(produce)

    # Before the routes of one model: "stats" is not a model's name here.
    router.add_api_route("/v2/models/stats", model_statistics, methods=["GET"])
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        router.add_api_route(prefix, model_metadata, methods=["GET"])
        router.add_api_route(prefix + "/config", model_config, methods=["GET"])
        router.add_api_route(prefix + "/stats", model_statistics, methods=["GET"])
        router.add_api_route(prefix + "/ready", model_ready, methods=["GET"])
        router.add_api_route(prefix + "/infer", infer, methods=["POST"])
        router.add_api_route(prefix + "/generate", generate, methods=["POST"])
        router.add_api_route(prefix + "/generate_stream", generate_stream, methods=["POST"])
    health.include_router(router)
    return health


async def _as_json(payload: Any) -> Response:
    return JSONResponse(payload)


def _generate_request(request: Request, sent: bytes, stream: bool) -> LLMRequest:
    """The generate extension's body (``sent``): `text_input`, and the sampling fields and flags
    (top-level or under `parameters`); the route says whether it streams."""
    text, parameters = _generate_input(_json_object(sent))
    parameters = _with_timeout_header(request, parameters)
    return llm_request(text, {**parameters, STREAM: stream})


def _json_fields(outputs: list[Tensor]) -> dict[str, Any]:
    """Output tensors of one element as JSON fields, as the generate extension answers them."""
    fields = {}
    for tensor in outputs:
        value = tensor.data.reshape(-1)[0]
        fields[tensor.name] = value.decode("utf-8") if isinstance(value, bytes) else value.item()
    return fields


async def _sse_events(
    model_name: str,
    model_version: str,
    llm: LLMRequest,
    first: GenerationChunk,
    rest: AsyncIterator[GenerationChunk],
) -> AsyncIterator[bytes]:
    """One `data:` event per text delta; the last one carries `finish_reason`."""

    def event(chunk: GenerationChunk) -> bytes:
        reason = None if chunk.result is None else chunk.result.finish_reason
        payload: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
        payload |= _json_fields(llm.outputs(chunk.text, chunk.stream, reason, chunk.new_tokens))
        if chunk.result is not None:
            payload["finish_reason"] = chunk.result.finish_reason
        return f"data: {json.dumps(payload)}\n\n".encode()

    yield event(first)
    try:
        async for chunk in rest:
            yield event(chunk)
    except InferenceError as exc:
        yield f"data: {json.dumps({'error': str(exc)})}\n\n".encode()
