"""Streaming OpenAI-compatible client that times each request: TTFT, inter-token gaps, end to end."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from inferd.bench.datasets import BenchRequest

Endpoint = Literal["completions", "chat"]

_ENDPOINT_PATHS: dict[Endpoint, str] = {
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
}


@dataclass
class RequestRecord:
    """What one request measured, in seconds; `start_s` and `chunk_times_s` count from the run's start."""

    index: int
    start_s: float
    max_tokens: int
    ttft_s: float | None = None
    e2e_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    tokens_from_usage: bool = False
    error: str | None = None
    error_detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive streamed chunks (a chunk may carry several tokens)."""
        times = self.chunk_times_s
        return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


class StreamError(Exception):
    """The server sent an error inside the stream or a stream we cannot read."""


async def iter_sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """Yield the payload of each server-sent event's `data:` fields, up to `[DONE]`.

    Per the SSE spec, an event may span several `data:` lines (joined by newlines) and ends at a blank line.
    An OpenAI-style stream always ends with `[DONE]`: one that closes without it was cut off (StreamError).
    """
    pending: list[str] = []
    async for line in lines:
        if line.startswith("data:"):
            pending.append(line[5:].removeprefix(" "))
            continue
        if line == "" and pending:
            payload = "\n".join(pending)
            pending = []
            if payload == "[DONE]":
                return
            yield payload
    if pending and "\n".join(pending) == "[DONE]":
        return
    if pending:
        yield "\n".join(pending)
    raise StreamError("the stream ended without data: [DONE]")


def chunk_text(chunk: dict[str, Any], endpoint: Endpoint) -> str:
    """The generated text a streamed chunk carries, across all its choices. A chat delta's reasoning
    (`reasoning_content`, or `reasoning` as newer servers name it) and tool-call text count as its
    content does: they are generated tokens, so a thinking model's first token is its first thought,
    and an answer that is all reasoning or a tool call is not an empty one."""
    parts = []
    for choice in chunk.get("choices") or []:
        if endpoint != "chat":
            parts.append(choice.get("text") or "")
            continue
        delta = choice.get("delta") or {}
        parts.append(delta.get("reasoning_content") or delta.get("reasoning") or "")
        parts.append(delta.get("content") or "")
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            parts.append((function.get("name") or "") + (function.get("arguments") or ""))
    return "".join(parts)


class OpenAIStreamClient:
    """Sends `BenchRequest`s to one server and model with `stream: true`, timing every chunk."""

    def __init__(
        self,
        base_url: str,
        model: str,
        endpoint: Endpoint = "completions",
        ignore_eos: bool = False,
        timeout_s: float = 600.0,
        api_key: str | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.url = base_url.rstrip("/").removesuffix("/v1") + _ENDPOINT_PATHS[endpoint]
        self.model = model
        self.endpoint: Endpoint = endpoint
        self.ignore_eos = ignore_eos
        # Fields every request carries beside the bench's own (a structured output, say).
        self.extra_body = dict(extra_body or {})
        # The whole request's deadline (`send`); httpx's own timeouts only bound each read, which a
        # server that keeps sending can hold open for ever.
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No connection cap: concurrency is the runner's decision, not the pool's.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._http = httpx.AsyncClient(timeout=timeout_s, headers=headers, limits=limits)

    async def aclose(self) -> None:
        await self._http.aclose()

    def build_body(self, request: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "temperature": 0.0,  # greedy unless the extra fields say otherwise
            **self.extra_body,  # before the fields the bench measures by, which stay its own
            "model": self.model,
            "max_tokens": request.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.endpoint == "chat":
            if not isinstance(request.prompt, str):
                raise ValueError("the chat endpoint needs text prompts: pass --tokenizer for random prompts")
            body["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.prompt
        if self.ignore_eos:
            # Not in OpenAI's API; vLLM, SGLang and inferd accept it. Others ignore unknown fields.
            body["ignore_eos"] = True
        return body

    async def send(self, index: int, request: BenchRequest, run_start: float) -> RequestRecord:
        """Run one request to the end; failures become a record with `error` set, never an exception."""
        sent_at = time.perf_counter()
        # The dataset's prompt length stands until the server's usage reports the real one.
        record = RequestRecord(
            index=index,
            start_s=sent_at - run_start,
            max_tokens=request.max_tokens,
            prompt_tokens=request.input_len,
        )
        try:
            body = self.build_body(request)
        except ValueError as exc:
            record.error, record.error_detail = "bad_request", str(exc)
            return record
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._stream_into(record, body, sent_at, run_start)
        except (TimeoutError, httpx.TimeoutException) as exc:
            record.error, record.error_detail = (
                "timeout",
                f"no full answer within {self.timeout_s:g} s ({exc!r})",
            )
        except httpx.TransportError as exc:
            record.error, record.error_detail = "connection", repr(exc)
        except (StreamError, httpx.HTTPError) as exc:  # the latter: e.g. a body that does not decode
            record.error, record.error_detail = "stream", str(exc) or repr(exc)
        return record

    async def _stream_into(
        self, record: RequestRecord, body: dict[str, Any], sent_at: float, run_start: float
    ) -> None:
        async with self._http.stream("POST", self.url, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode("utf-8", "replace")[:500]
                record.error, record.error_detail = f"http_{response.status_code}", detail
                return
            ended_early = None  # a finish reason that means the answer was cut by the server
            async for payload in iter_sse_data(response.aiter_lines()):
                now = time.perf_counter()
                chunk = _parse_chunk(payload)
                try:
                    text = chunk_text(chunk, self.endpoint)
                    ended_early = _early_end(chunk) or ended_early
                    usage = chunk.get("usage")
                    if usage:
                        prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
                        output_tokens = int(usage.get("completion_tokens") or 0)
                except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a chunk of an odd shape
                    raise StreamError(f"unreadable chunk: {exc!r} in {payload[:200]!r}") from exc
                if text:
                    if record.ttft_s is None:
                        record.ttft_s = now - sent_at
                    record.chunk_times_s.append(now - run_start)
                if usage:
                    record.prompt_tokens, record.output_tokens = prompt_tokens, output_tokens
                    record.tokens_from_usage = True
        record.e2e_s = time.perf_counter() - sent_at
        if ended_early is not None:
            # A server's own timeout or abort ends the stream as any answer ends (inferd's last chunk
            # says "timeout", vLLM's "abort"): a shortened answer, no completed request.
            record.error = f"server_{ended_early}"
            record.error_detail = f"the server ended the answer early: finish_reason {ended_early!r}"
            return
        if not record.tokens_from_usage:
            # Server ignored stream_options.include_usage: fall back to one token per chunk, flagged.
            record.output_tokens = len(record.chunk_times_s)
        if record.ttft_s is None:
            # E.g. only special tokens, which servers leave out of the text: no token time to measure.
            detail = f"the stream carried no generated text ({record.output_tokens} tokens by its count)"
            record.error, record.error_detail = "empty", detail


# Finish reasons with which servers end an answer they did not finish (inferd's and vLLM's).
_EARLY_ENDS = frozenset({"timeout", "abort", "error"})


def _early_end(chunk: dict[str, Any]) -> str | None:
    for choice in chunk.get("choices") or []:
        reason = choice.get("finish_reason")
        if reason in _EARLY_ENDS:
            return str(reason)
    return None


def _parse_chunk(payload: str) -> dict[str, Any]:
    try:
        chunk = json.loads(payload)
    except (json.JSONDecodeError, RecursionError) as exc:  # the latter: nested too deep
        raise StreamError(f"not JSON: {payload[:200]!r}") from exc
    if not isinstance(chunk, dict):
        raise StreamError(f"not a JSON object: {payload[:200]!r}")
    if "error" in chunk:
        raise StreamError(json.dumps(chunk["error"])[:500])
    return chunk


def first_served_model(base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> str:
    """The first model id a server lists at `/v1/models`, for when the user names none; a server
    that cannot be reached or lists none is a ValueError (the CLI's one-line error)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/").removesuffix("/v1") + "/v1/models"
    try:
        response = httpx.get(url, headers=headers, timeout=timeout_s)
        response.raise_for_status()
        listing = response.json()
    except (httpx.HTTPError, ValueError) as exc:  # the latter: a body that is not JSON
        raise ValueError(
            f"cannot list the models at {url} ({exc}); is the server up? Or pass --model"
        ) from None
    models = listing.get("data") if isinstance(listing, dict) else None
    if not models or not isinstance(models, list) or not isinstance(models[0], dict) or "id" not in models[0]:
        raise ValueError(f"{url} lists no models; pass --model")
    return str(models[0]["id"])
