"""The `inference.GRPCInferenceService` server (grpc.aio) over the shared data plane.

Runs on the same asyncio loop as the HTTP server so both feed the same dynamic batchers.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from google.protobuf import json_format

from inferd.server.kserve.grpc_codec import request_from_proto, response_to_proto
from inferd.server.limits import DEFAULT_MAX_BODY_BYTES
from inferd.serving.dataplane import DataPlane
from inferd.serving.errors import (
    InferenceError,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    RequestTimedOutError,
    ServerOverloadedError,
)
from inferd.serving.repository import ModelRepository

logger = logging.getLogger(__name__)

# One ModelStreamInfer call answers at most this many of its requests at once; the next ones are
# read as these end, so a client that sends faster than it is answered is held back by HTTP/2's
# flow control instead of making the server hold every request it sent.
STREAM_MAX_IN_FLIGHT = 64
# Responses of one call waiting to be sent at most: a client that does not read them holds up the
# requests that make more, not the server's memory.
STREAM_MAX_QUEUED_RESPONSES = 64
# The largest message the server sends (a response of large tensors travels in one message); what
# it receives is bounded by the server's request body limit instead (start_grpc_server).
_MAX_SEND_BYTES = 256 * 1024 * 1024


def _status_code(exc: InferenceError) -> Any:
    import grpc

    if isinstance(exc, InvalidInputError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, ModelNotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, ModelNotReadyError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, ServerOverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, RequestTimedOutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL


def _repository_parameters(request: Any) -> dict[str, object]:
    """A load or unload request's `ModelRepositoryParameter` map as plain values."""
    return {
        key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
        for key, value in request.parameters.items()
    }


# A refusal's message travels in the grpc-message trailer, which clients refuse past their metadata
# limit (8 KiB by default): one quoting a long model name reached them as RESOURCE_EXHAUSTED. In
# the trailer a byte outside printable ASCII takes three (%XX), so 2,000 bytes stay under 6 KiB.
_MAX_DETAILS_BYTES = 2000


def _details(exc: Exception) -> str:
    """``exc``'s message as a call's status details, cut to what every client takes."""
    message = str(exc)
    encoded = message.encode("utf-8", "backslashreplace")
    if len(encoded) <= _MAX_DETAILS_BYTES:
        return message
    kept = encoded[: _MAX_DETAILS_BYTES - 40].decode("utf-8", "ignore")  # no character cut in two
    return f"{kept}... ({len(encoded)} bytes in all)"


async def _require_one_repository(request: Any, context: Any) -> None:
    import grpc

    if request.repository_name:  # Triton refuses it the same way
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "'repository_name' is not supported: the server has one repository"
        )


async def _control_model(
    action: Callable[[str, dict[str, object]], Awaitable[None]], request: Any, context: Any
) -> None:
    """A load or unload call: the data plane's `action` on the named model, its refusal the call's."""
    await _require_one_repository(request, context)
    try:
        await action(request.model_name, _repository_parameters(request))
    except InferenceError as exc:
        await context.abort(_status_code(exc), _details(exc))


async def _answer_stream(plane: DataPlane, request_iterator: Any, pb2: Any) -> AsyncIterator[Any]:
    """`ModelStreamInfer`: each request is answered as soon as it arrives, beside the others, and
    its responses go out as they come, matched by request `id` (as Triton's decoupled models
    answer). A request's error is a response with `error_message`; the stream goes on. Every
    response carries `triton_final_response`; a streamed generation asked with
    `triton_enable_empty_final_response` gets its last response with no outputs. At most
    STREAM_MAX_IN_FLIGHT requests are answered at once and STREAM_MAX_QUEUED_RESPONSES responses
    wait to be sent: past those, requests and responses wait where the client's flow control holds
    them."""
    responses: asyncio.Queue[Any] = asyncio.Queue()  # bounded by `room`; unbounded for the end mark
    room = asyncio.Semaphore(STREAM_MAX_QUEUED_RESPONSES)
    in_flight = asyncio.Semaphore(STREAM_MAX_IN_FLIGHT)
    answering: set[asyncio.Task[None]] = set()

    async def send(message_out: Any) -> None:
        await room.acquire()  # released as the message is taken to be sent
        responses.put_nowait(message_out)

    async def answer(message: Any) -> None:
        try:
            name, version = message.model_name, message.model_version or None
            request = await plane.decoded(
                name,
                version,
                lambda: request_from_proto(message, plane.repository.shared_memory),
                True,  # a message's size costs a copy of it to learn: always off the loop
            )
            empty_final = request.parameters.pop("triton_enable_empty_final_response", False) is True
            stream = plane.infer_stream(name, version, request)
            answered = 0
            async for response, final in stream:
                response.parameters["triton_final_response"] = final
                # Only a last response that follows others (a streamed generation's end marker)
                # goes empty; a request's one response keeps its outputs, as Triton leaves a
                # model that answers once.
                if final and empty_final and answered:
                    response.outputs = []
                answered += 1
                await send(pb2.ModelStreamInferResponse(infer_response=response_to_proto(response, pb2)))
        except Exception as exc:
            if not isinstance(exc, InferenceError):
                logger.exception("stream request %r to model %r failed", message.id, message.model_name)
            # The failed request's id rides along, so a client can tell which of its requests failed.
            failed = pb2.ModelInferResponse(
                model_name=message.model_name, model_version=message.model_version, id=message.id
            )
            error = str(exc) if isinstance(exc, InferenceError) else f"internal error: {type(exc).__name__}"
            await send(pb2.ModelStreamInferResponse(error_message=error, infer_response=failed))

    def done_answering(task: asyncio.Task[None]) -> None:
        answering.discard(task)
        in_flight.release()

    async def read() -> None:
        async for message in request_iterator:
            # Until an answer ends, this request waits and the client's next ones stay unread.
            await in_flight.acquire()
            task = asyncio.create_task(answer(message))
            answering.add(task)
            task.add_done_callback(done_answering)
        while answering:
            await asyncio.wait(set(answering))

    reader = asyncio.create_task(read())
    # Every request answered and the client sends no more, or its requests could not be read.
    reader.add_done_callback(lambda _: responses.put_nowait(None))
    try:
        while (message := await responses.get()) is not None:
            room.release()
            yield message
        await reader  # a failure to read the client's requests ends the call with it
    finally:  # the client hung up, or the call ended: stop generating for it
        for task in (reader, *answering):
            task.cancel()


def _servicer(plane: DataPlane) -> Any:
    from inferd.server.kserve.proto import grpc_service_pb2 as pb2
    from inferd.server.kserve.proto import grpc_service_pb2_grpc as pb2_grpc

    class InferenceServicer(pb2_grpc.GRPCInferenceServiceServicer):
        async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 (names fixed by the proto)
            return pb2.ServerLiveResponse(live=True)

        async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb2.ServerReadyResponse(ready=plane.server_unready_reason() is None)

        async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
            try:
                return pb2.ModelReadyResponse(ready=plane.model_ready(request.name, request.version or None))
            except InferenceError as exc:
                await context.abort(_status_code(exc), _details(exc))

        async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb2.ServerMetadataResponse(**plane.server_metadata())

        async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
            try:
                metadata = plane.model_metadata(request.name, request.version or None)
            except InferenceError as exc:
                await context.abort(_status_code(exc), _details(exc))
            return pb2.ModelMetadataResponse(
                name=metadata["name"],
                versions=metadata["versions"],
                platform=metadata["platform"],
                inputs=[pb2.ModelMetadataResponse.TensorMetadata(**t) for t in metadata["inputs"]],
                outputs=[pb2.ModelMetadataResponse.TensorMetadata(**t) for t in metadata["outputs"]],
            )

        async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
            try:
                name, version = request.model_name, request.model_version or None
                decoded = await plane.decoded(
                    name,
                    version,
                    lambda: request_from_proto(request, plane.repository.shared_memory),
                    True,  # a message's size costs a copy of it to learn: always off the loop
                )
                response = await plane.infer(name, version, decoded)
            except InferenceError as exc:
                await context.abort(_status_code(exc), _details(exc))
            return response_to_proto(response, pb2)

        async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
            async for message in _answer_stream(plane, request_iterator, pb2):
                yield message

        async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
            await _require_one_repository(request, context)
            models = plane.repository_index(ready_only=request.ready)
            return pb2.RepositoryIndexResponse(
                models=[pb2.RepositoryIndexResponse.ModelIndex(**model) for model in models]
            )

        async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:  # noqa: N802
            await _control_model(plane.load, request, context)
            return pb2.RepositoryModelLoadResponse()

        async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:  # noqa: N802
            await _control_model(plane.unload, request, context)
            return pb2.RepositoryModelUnloadResponse()

        async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:  # noqa: N802
            try:
                regions = plane.shared_memory.status(request.name or None)
            except InferenceError as exc:
                await context.abort(_status_code(exc), _details(exc))
            status = pb2.SystemSharedMemoryStatusResponse.RegionStatus
            return pb2.SystemSharedMemoryStatusResponse(
                regions={
                    str(r["name"]): status(
                        name=str(r["name"]),
                        key=str(r["key"]),
                        offset=int(r["offset"]),
                        byte_size=int(r["byte_size"]),
                    )
                    for r in regions
                }
            )

        async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:  # noqa: N802
            try:
                plane.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
            except InferenceError as exc:
                await context.abort(_status_code(exc), _details(exc))
            return pb2.SystemSharedMemoryRegisterResponse()

        async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:  # noqa: N802
            try:
                plane.shared_memory.unregister(request.name or None)
            except InferenceError as exc:
                await context.abort(_status_code(exc), _details(exc))
            return pb2.SystemSharedMemoryUnregisterResponse()

        async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
            try:
                config = plane.model_config(request.name, request.version or None)
            except InferenceError as exc:
                await context.abort(_status_code(exc), _details(exc))
            # The REST answer is the configuration's JSON form: the same message, field for field.
            try:
                return pb2.ModelConfigResponse(config=json_format.ParseDict(config, pb2.ModelConfig()))
            except json_format.ParseError as exc:  # a value past the message's field (an int32's range)
                failure = InferenceError(f"the configuration has no gRPC form: {exc}")
                await context.abort(_status_code(failure), _details(failure))

        async def ModelStatistics(self, request: Any, context: Any) -> Any:  # noqa: N802
            try:
                stats = plane.model_statistics(request.name or None, request.version or None)
            except InferenceError as exc:
                await context.abort(_status_code(exc), _details(exc))
            return json_format.ParseDict(stats, pb2.ModelStatisticsResponse())

    return InferenceServicer()


# The health calls stay open with an API key, as the REST health probes do: orchestrators call them
# without credentials.
_OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})


def _api_key_interceptor(api_key: str) -> Any:
    """Refuses every call but the health ones (`UNAUTHENTICATED`) unless its metadata carries
    `authorization: Bearer KEY`, the header the HTTP routes take (tritonclient sends it with
    `headers={"authorization": ...}`)."""
    import grpc

    expected = f"Bearer {api_key}".encode()
    message = "a valid API key is required: send metadata 'authorization: Bearer <key>'"

    async def refuse_one(request: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request_iterator: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    class ApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            handler = await continuation(details)
            if handler is None or details.method.rsplit("/", 1)[-1] in _OPEN_METHODS:
                return handler
            given = dict(details.invocation_metadata or ()).get("authorization", "")
            # Constant-time, so the key cannot be guessed byte by byte from response times.
            if secrets.compare_digest(given.encode() if isinstance(given, str) else given, expected):
                return handler
            if handler.request_streaming:
                return grpc.stream_stream_rpc_method_handler(refuse_stream)
            return grpc.unary_unary_rpc_method_handler(refuse_one)

    return ApiKeyInterceptor()


def server_options(max_receive_bytes: int) -> list[tuple[str, int]]:
    """The gRPC server's channel options. Large tensors travel in one message, so gRPC's 4 MiB
    default is lifted; a request may be as large as a REST body (`--max-body-bytes`) and no larger:
    gRPC decodes the whole message before any check of its contents."""
    if max_receive_bytes <= 0:  # gRPC reads -1 as no limit at all
        raise ValueError(
            f"the largest gRPC request must be a positive number of bytes, got {max_receive_bytes}"
        )
    return [
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", _MAX_SEND_BYTES),
    ]


async def start_grpc_server(
    repository: ModelRepository,
    host: str,
    port: int,
    api_key: str | None = None,
    max_receive_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> Any:
    """Starts serving on host:port and returns the `grpc.aio.Server` (call `stop(grace)` to end it).
    With `api_key`, every call but the health ones needs it (`_api_key_interceptor`); a request
    message over `max_receive_bytes` (the server's body limit) is refused (`RESOURCE_EXHAUSTED`)."""
    import grpc

    from inferd.server.kserve.proto import grpc_service_pb2_grpc as pb2_grpc

    server = grpc.aio.server(
        interceptors=[_api_key_interceptor(api_key)] if api_key else [],
        options=server_options(max_receive_bytes),
    )
    pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_servicer(DataPlane(repository)), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the gRPC server to {host}:{port}")
    await server.start()
    return server
