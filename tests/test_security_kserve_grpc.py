"""gRPC transport limits (audit #11): a request message is held to the server's body limit
(`--max-body-bytes`) instead of a fixed 256 MiB, and one `ModelStreamInfer` call answers a bounded
number of requests at once and holds a bounded number of responses, so a client that sends faster
than it reads is held back by flow control instead of growing the server's tasks and queue.

The stream is driven here with stand-ins for the data plane and the protobuf module: the server's
generated modules cannot share a process with tritonclient's (docs/kserve.md)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from inferd.server.kserve.grpc_server import (
    STREAM_MAX_IN_FLIGHT,
    STREAM_MAX_QUEUED_RESPONSES,
    _answer_stream,
    server_options,
)
from inferd.server.limits import DEFAULT_MAX_BODY_BYTES
from inferd.serving.errors import InvalidInputError
from inferd.serving.tensor import InferRequest

SENT = 5000  # far more requests than one call may hold
WAIT_S = 10.0

# The two messages the stream builds, as plain objects.
FAKE_PB2 = SimpleNamespace(
    ModelInferResponse=lambda **fields: SimpleNamespace(**fields),
    ModelStreamInferResponse=lambda **fields: SimpleNamespace(**fields),
)


class RefusingPlane:
    """Answers every request at once, with an error response (no protobuf needed)."""

    repository = SimpleNamespace(shared_memory=None)

    async def decoded(self, name: str, version: str | None, decode: Any, off_loop: bool) -> InferRequest:
        raise InvalidInputError("refused")


class NeverAnsweringPlane(RefusingPlane):
    """Takes every request and never answers it (a generation that runs for a long time)."""

    def __init__(self) -> None:
        self.started = 0

    async def decoded(self, name: str, version: str | None, decode: Any, off_loop: bool) -> InferRequest:
        return InferRequest(inputs=[])

    async def infer_stream(self, name: str, version: str | None, request: InferRequest) -> AsyncIterator[Any]:
        self.started += 1
        await asyncio.Event().wait()
        yield  # an async generator that never yields


class Client:
    """A client's request stream: counts the requests the server has read."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.read = 0

    async def __aiter__(self) -> AsyncIterator[Any]:
        for index in range(self.count):
            self.read += 1
            yield SimpleNamespace(model_name="m", model_version="", id=str(index))


async def _settle() -> None:
    """Time for the call's tasks to do all they can."""
    for _ in range(20):
        await asyncio.sleep(0.005)


async def test_a_client_that_reads_no_responses_is_held_back() -> None:
    """Every request became a task and every answer went into an unbounded queue: 100,000 tiny
    requests whose responses were never read cost 241 MiB and 28 s of CPU."""
    client = Client(SENT)
    call = _answer_stream(RefusingPlane(), client, FAKE_PB2)
    first = await anext(call)  # then the client reads nothing more
    await _settle()
    assert first.error_message == "refused"
    # The responses waiting, the requests waiting to put theirs, the one taken, the one read next.
    assert client.read <= STREAM_MAX_QUEUED_RESPONSES + STREAM_MAX_IN_FLIGHT + 2
    await call.aclose()


async def test_requests_whose_answers_take_long_are_answered_a_bounded_number_at_once() -> None:
    plane, client = NeverAnsweringPlane(), Client(SENT)
    call = _answer_stream(plane, client, FAKE_PB2)
    waiting = asyncio.ensure_future(anext(call))
    await _settle()
    assert plane.started == STREAM_MAX_IN_FLIGHT
    assert client.read <= STREAM_MAX_IN_FLIGHT + 1  # the next request waits, read or not
    waiting.cancel()  # the client hangs up: the call ends, and stops what it was answering
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_every_request_of_a_long_stream_is_still_answered() -> None:
    client = Client(SENT)

    async def answers() -> list[str]:
        return [
            response.infer_response.id async for response in _answer_stream(RefusingPlane(), client, FAKE_PB2)
        ]

    ids = await asyncio.wait_for(answers(), WAIT_S)
    assert sorted(ids, key=int) == [str(index) for index in range(SENT)]


def test_a_grpc_request_may_be_as_large_as_a_request_body() -> None:
    """The receive limit was 256 MiB whatever `--max-body-bytes` said: a 200 MiB `ModelInfer` was
    decoded before its batch size was refused."""
    options = dict(server_options(1_000_000))
    assert options["grpc.max_receive_message_length"] == 1_000_000
    assert options["grpc.max_send_message_length"] >= DEFAULT_MAX_BODY_BYTES  # large answers still go out


@pytest.mark.parametrize("limit", [0, -1])
def test_a_grpc_request_limit_is_never_lifted(limit: int) -> None:
    with pytest.raises(ValueError, match="positive number of bytes"):  # gRPC reads -1 as no limit
        server_options(limit)
