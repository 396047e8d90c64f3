"""An error after a stream has started goes out as a final SSE event in the protocol's shape."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from inferd.engine.outputs import RequestMetrics, RequestOutput
from inferd.sample.sampler import TokenLogprobs
from inferd.sampling_params import SamplingParams
from inferd.server.errors import GenerationError, OverloadedError
from inferd.server.frontend import IndexedOutput
from inferd.server.openai.chat import ChatJob, stream_chat
from inferd.server.openai.completions import CompletionJob, stream_completion
from inferd.server.streaming import started_sse_response
from inferd.server.tgi.generation import TgiJob, stream_generate


def _output(text: str, token_id: int, finish_reason: str | None = None) -> RequestOutput:
    return RequestOutput(
        request_id="r-0",
        prompt_token_ids=[1],
        text=text,
        token_ids=[token_id],
        new_text=text,
        new_token_ids=[token_id],
        finished=finish_reason is not None,
        finish_reason=finish_reason,
        metrics=RequestMetrics(arrival_time=0.0),
    )


class _FailingFrontend:
    """Yields one good output, then fails the way the given final output says."""

    tokenizer = None
    eos_token_ids = frozenset({0})

    def __init__(self, final: RequestOutput | None) -> None:
        self.final = final

    def generate(self, *_: Any, **__: Any) -> AsyncIterator[IndexedOutput]:
        async def outputs() -> AsyncIterator[IndexedOutput]:
            yield IndexedOutput(0, _output("a", 5))
            if self.final is None:
                raise GenerationError("engine step failed: boom")
            yield IndexedOutput(0, self.final)

        return outputs()


async def _events(stream: AsyncIterator[str]) -> list[str]:
    events = [event async for event in stream]
    assert all(event.startswith("data: ") and event.endswith("\n\n") for event in events)
    return [event[len("data: ") : -2] for event in events]


def _completion_job() -> CompletionJob:
    return CompletionJob("cmpl-x", "m", [[1]], [], SamplingParams(), 1, echo=False, include_usage=True)


async def test_openai_completion_stream_ends_with_error_then_done() -> None:
    events = await _events(stream_completion(_FailingFrontend(None), _completion_job()))  # type: ignore[arg-type]
    assert json.loads(events[0])["choices"][0]["text"] == "a"
    error = json.loads(events[-2])["error"]
    assert error["message"] == "engine step failed: boom" and error["type"] == "server_error"
    assert events[-1] == "[DONE]"


async def test_request_aborted_mid_stream_is_an_error_event() -> None:
    aborted = _output("", 6, finish_reason="abort")
    job = ChatJob("chatcmpl-x", "m", [1], SamplingParams(), 1, want_logprobs=False, include_usage=False)
    events = await _events(stream_chat(_FailingFrontend(aborted), job))  # type: ignore[arg-type]
    assert "ended early: abort" in json.loads(events[-2])["error"]["message"]
    assert events[-1] == "[DONE]"


class _FailingTgiFrontend(_FailingFrontend):
    """As `_FailingFrontend`, its good output a token with its log-probability (TGI's events are
    one per token)."""

    class tokenizer:  # noqa: N801 (stands in for the Tokenizer instance)
        special_token_ids: frozenset[int] = frozenset()

    def generate(self, *_: Any, **__: Any) -> AsyncIterator[IndexedOutput]:
        async def outputs() -> AsyncIterator[IndexedOutput]:
            first = _output("a", 5)
            first.new_logprobs = [TokenLogprobs(5, -0.5, (), 1)]
            yield IndexedOutput(0, first)
            raise GenerationError("engine step failed: boom")

        return outputs()


async def test_tgi_stream_ends_with_error_event() -> None:
    job = TgiJob("tgi-x", [1], "p", SamplingParams(logprobs=0), details=False, full_text=False)
    events = await _events(stream_generate(_FailingTgiFrontend(None), job))  # type: ignore[arg-type]
    assert json.loads(events[0])["token"]["text"] == "a"
    assert json.loads(events[-1]) == {"error": "engine step failed: boom", "error_type": "generation"}


class _RefusingFrontend:
    """Fails before any output, as a full queue does when the request is admitted."""

    tokenizer = None
    eos_token_ids = frozenset({0})

    def generate(self, *_: Any, **__: Any) -> AsyncIterator[IndexedOutput]:
        async def outputs() -> AsyncIterator[IndexedOutput]:
            raise OverloadedError("the server is overloaded", 1)
            yield  # an async generator

        return outputs()


class _ConnectedRequest:
    """A request whose client stays: its next ASGI message never comes."""

    async def receive(self) -> dict[str, str]:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}


async def test_an_error_before_anything_was_sent_is_raised_for_the_status_line() -> None:
    """started_sse_response makes the first event before the response starts: a stream that fails
    before it has sent anything raises, so the route answers with the error's own status."""
    job = TgiJob("tgi-x", [1], "p", SamplingParams(logprobs=0), details=False, full_text=False)
    chat = ChatJob("chatcmpl-x", "m", [1], SamplingParams(), 1, want_logprobs=False, include_usage=False)
    for stream in (
        stream_generate(_RefusingFrontend(), job),  # type: ignore[arg-type]
        stream_chat(_RefusingFrontend(), chat),  # type: ignore[arg-type]
        stream_completion(_RefusingFrontend(), _completion_job()),  # type: ignore[arg-type]
    ):
        with pytest.raises(OverloadedError):
            await started_sse_response(_ConnectedRequest(), stream)  # type: ignore[arg-type]


class _EosFrontend:
    """One text token, then the EOS that ends the answer and adds no text."""

    class tokenizer:  # noqa: N801 (stands in for the Tokenizer instance)
        special_token_ids = frozenset({0})

        @staticmethod
        def decode(token_ids: list[int], skip_special_tokens: bool) -> str:
            assert token_ids == [0] and not skip_special_tokens
            return "</s>"

    eos_token_ids = frozenset({0})

    def generate(self, *_: Any, **__: Any) -> AsyncIterator[IndexedOutput]:
        async def outputs() -> AsyncIterator[IndexedOutput]:
            first = _output("a", 5)
            first.new_logprobs = [TokenLogprobs(5, -0.5, (), 1)]
            yield IndexedOutput(0, first)
            end = _output("", 0, finish_reason="stop")
            end.text, end.token_ids, end.new_logprobs = "a", [5, 0], [TokenLogprobs(0, -0.1, (), 1)]
            yield IndexedOutput(0, end)

        return outputs()


async def test_tgi_stream_shows_the_eos_tokens_own_text() -> None:
    job = TgiJob("tgi-x", [1], "p", SamplingParams(logprobs=0), details=True, full_text=False)
    events = [json.loads(e) for e in await _events(stream_generate(_EosFrontend(), job))]  # type: ignore[arg-type]
    assert [(e["token"]["text"], e["token"]["special"]) for e in events] == [("a", False), ("</s>", True)]
    assert events[-1]["generated_text"] == "a" and events[-1]["details"]["finish_reason"] == "eos_token"
