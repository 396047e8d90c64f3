"""`POST /v1/responses`: a Responses API request served by the chat path (the same template,
sampling, tool calls, reasoning split and structured outputs), its answer given as output items:
the thinking as a reasoning item, the text as a message, each tool call as a function call item.

Streamed, the answer is the API's typed events (`response.created`, the items' `added` / delta /
`done` events, then `response.completed` or `response.incomplete`), numbered in order; an error
after the stream has started is an `error` event. A stored response (`store`, the default) can be
read back and continued from (`previous_response_id`): ``response_store.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from inferd.engine.outputs import RequestOutput
from inferd.sample.sampler import TokenLogprobs
from inferd.server.errors import ApiError, InvalidRequestError, ModelNotFoundError
from inferd.server.frontend import Frontend
from inferd.server.openai.chat import ChatJob, chat_logprobs, prepare_chat
from inferd.server.openai.chat_answer import ShapedText
from inferd.server.openai.common import error_body, finish_reason
from inferd.server.openai.protocol import ChatCompletionRequest
from inferd.server.openai.response_store import ResponseStore, StoredResponse
from inferd.server.openai.responses_protocol import (
    ResponsesRequest,
    chat_response_format,
    chat_tool_choice,
    chat_tools,
    input_messages,
    listed_input_items,
)
from inferd.server.tool_calls import ParsedToolCall

logger = logging.getLogger(__name__)


class ResponseNotFoundError(ModelNotFoundError):
    """A response id the store does not hold (never stored, deleted, or dropped as the oldest)."""

    code = "response_not_found"


@dataclass
class ResponseJob:
    response_id: str
    body: ResponsesRequest
    chat: ChatJob
    # The conversation answered, without the instructions (they do not carry over).
    conversation: list[dict[str, Any]]
    created_at: int
    # The same conversation as the API's items (its input items, listed back).
    input_items: list[dict[str, Any]]


# The chat request's fields as this API names them, for errors raised on the chat path (longest
# first: a name's prefix must not match before the name).
_FIELD_NAMES = {
    "response_format.json_schema": "text.format",
    "response_format": "text",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "messages": "input",
}
# Only a message's leading field path is a field name; anything after it may quote the client.
_LEADING_NAME = re.compile(r"^(" + "|".join(re.escape(name) for name in _FIELD_NAMES) + r")(?=[.\[:]|$)")
# The one message that names a chat field later on (the context check's).
_CONTEXT_PHRASE = ("and max_tokens asks for", "and max_output_tokens asks for")


def previous_response(body: ResponsesRequest, store: ResponseStore) -> StoredResponse | None:
    """The stored response the request continues (``previous_response_id``), if it names one: one
    that answered, else a 4xx. Read on the event loop, which alone changes the store."""
    if body.previous_response_id is None:
        return None
    previous = store.get(body.previous_response_id)
    if previous is None:
        raise ResponseNotFoundError(
            f"previous_response_id: no stored response {body.previous_response_id!r}", "previous_response_id"
        )
    if previous.status not in ("completed", "incomplete"):
        # Its answer is not there (yet, or ever): the conversation would go on without it.
        raise InvalidRequestError(
            f"previous_response_id: response {body.previous_response_id!r} is {previous.status}; a "
            "conversation continues only from a completed or incomplete response",
            "previous_response_id",
        )
    return previous


def prepare_response(
    frontend: Frontend, body: ResponsesRequest, previous: StoredResponse | None
) -> ResponseJob:
    """Validate, continue the ``previous`` conversation if there is one, and prepare it as a chat;
    every error here is a 4xx before generation (the fields refused by name are checked first,
    ``ResponsesRequest.refuse_unsupported``, before the stored response is looked up)."""
    history: list[dict[str, Any]] = []
    earlier_items: list[dict[str, Any]] = []
    if previous is not None:
        history = previous.messages
        earlier_items = previous.input_items + previous.output
    new = input_messages(body.input)
    if not new:
        raise InvalidRequestError("input: no message to answer", "input")
    conversation = history + new
    instructions = [{"role": "system", "content": body.instructions}] if body.instructions else []
    fields: dict[str, Any] = {
        "messages": instructions + conversation,
        "parallel_tool_calls": body.parallel_tool_calls,
    }
    passed = {"model", "temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty", "logit_bias",
              "priority", "cache_salt"}  # fmt: skip
    fields.update({name: getattr(body, name) for name in passed & body.model_fields_set})
    fields["max_completion_tokens"] = body.max_output_tokens
    if body.wants_logprobs:
        fields["logprobs"], fields["top_logprobs"] = True, body.top_logprobs or 0
    fields["tools"] = chat_tools(body.tools)
    fields["tool_choice"] = chat_tool_choice(body.tool_choice)
    fields["response_format"] = chat_response_format(body.text)
    try:
        chat_body = ChatCompletionRequest.model_validate(fields)
        chat = prepare_chat(frontend, chat_body)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error.get("loc") else None
        raise _in_responses_terms(InvalidRequestError(f"{name}: {error['msg']}", name)) from None
    except ApiError as exc:
        raise _in_responses_terms(exc) from None
    response_id = f"resp_{uuid.uuid4().hex}"
    chat = dataclasses.replace(chat, request_id=response_id)
    items = earlier_items + listed_input_items(body.input)
    return ResponseJob(response_id, body, chat, conversation, int(time.time()), items)


def _in_responses_terms(error: ApiError) -> ApiError:
    """An error of the chat path naming this API's fields, in its message and its param."""
    renamed = _LEADING_NAME.sub(lambda match: _FIELD_NAMES[match.group(1)], error.message)
    error.message = renamed.replace(*_CONTEXT_PHRASE)
    error.args = (error.message,)
    if error.field is not None:
        error.field = _LEADING_NAME.sub(lambda match: _FIELD_NAMES[match.group(1)], error.field)
    return error


class _Answer:
    """One answer's output items, built from its deltas in the order they come, for a whole
    response and a stream alike (so the two agree): the events go out only when streaming."""

    def __init__(
        self, frontend: Frontend, job: ResponseJob, store: ResponseStore, events: _EventWriter
    ) -> None:
        self.frontend, self.job, self.store, self.events = frontend, job, store, events
        self.shaper = job.chat.shaper()
        self.items = _StreamedItems(events)
        self.reasoning: list[str] = []
        self.response: dict[str, Any] | None = None

    def feed(self, out: RequestOutput) -> list[str]:
        """The events of one more output; the last one's end with the finished response (stored
        first). A timeout or an engine error raises the request's error."""
        reason = finish_reason(out)
        shaped = self.shaper.feed(out.new_text, out.finished)
        self.reasoning.append(shaped.reasoning)
        logprobs = _logprobs(self.frontend, out.new_logprobs) if self.job.body.wants_logprobs else []
        sent = self.items.feed(shaped, logprobs)
        if out.finished:
            status = "completed" if reason == "stop" else "incomplete"
            sent += self.items.finish(status)
            usage = _usage(self.frontend, self.job, out, "".join(self.reasoning))
            self.response = _response(self.job, status, self.items.output, usage)
            _remember(self.store, self.job, self.response)
            kind = "response.completed" if status == "completed" else "response.incomplete"
            sent.append(self.events.event(kind, response=self.response))
        return sent


async def respond(frontend: Frontend, job: ResponseJob, store: ResponseStore) -> dict[str, Any]:
    answer = _Answer(frontend, job, store, _EventWriter(streaming=False))
    async with aclosing(_outputs(frontend, job)) as outputs:
        async for out in outputs:
            answer.feed(out)
    assert answer.response is not None, "the Frontend ends every stream with a finished output"
    return answer.response


async def stream_response(
    frontend: Frontend, job: ResponseJob, store: ResponseStore
) -> AsyncGenerator[str, None]:
    """The answer's events, ``response.created`` and ``response.in_progress`` first, sent with its
    first output: an error before that (a full queue, found as the request is admitted) is raised,
    so started_sse_response answers with its status (a 429 with Retry-After). A later one is an
    ``error`` event, and the response is not stored."""
    events = _EventWriter()
    answer = _Answer(frontend, job, store, events)
    sent = False
    try:
        async with aclosing(_outputs(frontend, job)) as outputs:
            async for out in outputs:
                if not sent:
                    sent = True
                    started = _response(job, "in_progress", [], None)
                    yield events.event("response.created", response=started)
                    yield events.event("response.in_progress", response=started)
                for event in answer.feed(out):
                    yield event
    except ApiError as exc:
        if not sent:
            raise
        body = error_body(exc)["error"]
        yield events.event("error", code=body["code"] or body["type"], message=exc.message, param=exc.field)


async def _outputs(frontend: Frontend, job: ResponseJob) -> AsyncGenerator[RequestOutput, None]:
    """The answer's outputs, the last one finished; closed, its engine request is aborted."""
    chat = job.chat
    stream = frontend.generate(chat.request_id, [chat.prompt], chat.params, 1, chat.timeout_s)
    async with aclosing(stream):
        async for item in stream:
            yield item.output


class StreamNotKeptError(InvalidRequestError):
    """``GET /v1/responses/{id}?stream=true`` for a response whose events are not held."""


class _EventLog:
    """A streamed background response's events as sent, for every reader: the one that created
    it and any that resume after a dropped connection. An event's sequence number is its index."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.chars = 0
        self.closed = False
        self._changed = asyncio.Event()

    def append(self, event: str) -> None:
        self.events.append(event)
        self.chars += len(event)
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, after: int) -> AsyncIterator[str]:
        """The events numbered past ``after`` (-1: all), then each new one until the log closes.
        A reader that goes away stops reading; the answer goes on."""
        index = after + 1
        while True:
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.closed:
                return
            await self._changed.wait()


# Event logs of streamed background responses kept once they have ended, for readers that resume
# late: the most recent ones, up to this many and this many characters of events in all (a long
# answer's deltas with log-probabilities run to megabytes). A running response's log is always kept.
KEPT_EVENT_LOGS = 64
KEPT_EVENT_CHARS = 64 * 2**20


class BackgroundResponses:
    """Responses created with ``background: true``: answered by a task of their own while the
    client polls ``GET /v1/responses/{id}`` (the store holds the queued, then the finished object)
    or cancels them. A failed one (a timeout, an engine error) is stored with status ``failed``
    and its error; a cancelled one, whose engine request is aborted, with status ``cancelled``.

    With ``stream: true`` too, the task writes the response's events to a log that the creating
    request reads as its stream; a reader whose connection drops can read on from any event with
    ``GET /v1/responses/{id}?stream=true&starting_after=N``. The answer never depends on a
    reader: it runs to its end (or its cancellation) whoever reads."""

    def __init__(self, frontend: Frontend, store: ResponseStore) -> None:
        self.frontend, self.store = frontend, store
        self._running: dict[str, tuple[asyncio.Task[None], ResponseJob]] = {}
        self._logs: dict[str, _EventLog] = {}  # running ones, then the most recent ended ones

    @property
    def num_running(self) -> int:
        """Responses being answered now (one leaves as its task ends, a cancelled one too)."""
        return len(self._running)

    def start(self, job: ResponseJob) -> dict[str, Any]:
        """Store the queued response, start answering it; returns the queued response."""
        queued = _response(job, "queued", [], None)
        self._put(job, queued)
        log = None
        if job.body.stream:
            log = self._logs[job.response_id] = _EventLog()
        task = asyncio.create_task(self._answer(job, log))
        self._running[job.response_id] = (task, job)
        task.add_done_callback(lambda _: self._ended(job.response_id))
        return queued

    def events(self, response_id: str, after: int) -> AsyncIterator[str]:
        """A streamed background response's events past ``after`` (-1: all of them), live until it
        ends. StreamNotKeptError where none are held: the response did not stream in the
        background, or ended before the ``KEPT_EVENT_LOGS`` most recent ones (fewer where their
        events pass ``KEPT_EVENT_CHARS``)."""
        log = self._logs.get(response_id)
        if log is None:
            raise StreamNotKeptError(
                f"response {response_id!r} has no events to stream: only a response created with "
                "background and stream can be, and of those that have ended only the most recent; "
                "GET it without stream",
                "stream",
            )
        return log.follow(after)

    def _ended(self, response_id: str) -> None:
        self._running.pop(response_id, None)
        log = self._logs.pop(response_id, None)  # None once deleted
        if log is not None:
            log.close()  # a cancelled answer's readers end too
            self._logs[response_id] = log  # the newest ended one, last
        ended = [key for key in self._logs if key not in self._running]  # oldest first
        kept = sum(self._logs[key].chars for key in ended)
        while ended and (len(ended) > KEPT_EVENT_LOGS or kept > KEPT_EVENT_CHARS):
            kept -= self._logs.pop(ended.pop(0)).chars

    async def _answer(self, job: ResponseJob, log: _EventLog | None) -> None:
        events = _EventWriter(streaming=log is not None)
        if log is not None:
            queued = _response(job, "queued", [], None)
            log.append(events.event("response.created", response=queued))
            log.append(events.event("response.queued", response=queued))
        in_progress = _response(job, "in_progress", [], None)
        self._put(job, in_progress)
        if log is not None:
            log.append(events.event("response.in_progress", response=in_progress))
        try:
            # Stores the finished response; the events go to the log when streaming.
            answer = _Answer(self.frontend, job, self.store, events)
            async with aclosing(_outputs(self.frontend, job)) as outputs:
                async for out in outputs:
                    for event in answer.feed(out):
                        if log is not None:
                            log.append(event)
        except ApiError as exc:
            # A response's error codes are the API's few (the SDK checks them): the protocol's
            # own code goes into the message.
            body = error_body(exc)["error"]
            code = "rate_limit_exceeded" if exc.kind == "overloaded" else "server_error"
            self._fail(job, log, events, code, f"{exc.message} ({body['code'] or body['type']})")
        except Exception as exc:  # the server's own fault: the response must not stay in progress
            # Its text stays in the log, as a route's 500 keeps it (errors.internal_error_response).
            logger.exception("background response %s failed: %r", job.response_id, exc)
            message = f"the server failed to answer; its log has the details under {job.response_id}"
            self._fail(job, log, events, "server_error", message)

    def _fail(
        self, job: ResponseJob, log: _EventLog | None, events: _EventWriter, code: str, message: str
    ) -> None:
        """Store the response failed with ``code`` and ``message``, and end its stream so."""
        failed = {**_response(job, "failed", [], None), "error": {"code": code, "message": message}}
        self._put(job, failed)
        if log is not None:
            log.append(events.event("response.failed", response=failed))

    def _put(self, job: ResponseJob, response: dict[str, Any]) -> None:
        self.store.put(job.response_id, StoredResponse.of(response, job.conversation, job.input_items))

    def forget(self, response_id: str) -> None:
        """Drop a deleted response's events, ending its readers (cancelled first: its task's end
        keeps nothing then)."""
        log = self._logs.pop(response_id, None)
        if log is not None:
            log.close()

    async def cancel(self, response_id: str) -> None:
        """Stop a background response still being answered (its engine request aborted) and store
        it as cancelled; once it has ended this does nothing. Its stream's readers end."""
        running = self._running.get(response_id)
        if running is None:
            return
        task, job = running
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if task.cancelled():  # not finished in between
            self._put(job, _response(job, "cancelled", [], None))


def input_items_page(
    stored: StoredResponse, after: str | None, limit: int, order: Literal["asc", "desc"]
) -> dict[str, Any]:
    """A page of the conversation a stored response answered, as its items (the earlier turns'
    input and output, then its own input), in ``order`` (newest first with ``desc``), past the item
    ``after``; at most ``limit`` (1 to 100) of them."""
    if not 1 <= limit <= 100:
        raise InvalidRequestError(f"limit: must be from 1 to 100, got {limit}", "limit")
    items = stored.input_items if order == "asc" else stored.input_items[::-1]
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise InvalidRequestError(f"after: the response has no input item {after!r}", "after")
        start = ids.index(after) + 1
    page = items[start : start + limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": start + limit < len(items),
    }


def _remember(store: ResponseStore, job: ResponseJob, response: dict[str, Any]) -> None:
    if job.body.store:
        # The answer's items read as input items are the messages that continue the conversation.
        continued = job.conversation + input_messages(response["output"])
        store.put(job.response_id, StoredResponse.of(response, continued, job.input_items))


def _response(
    job: ResponseJob, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None
) -> dict[str, Any]:
    """The response object; an incomplete one ran out of its token budget."""
    body, params = job.body, job.chat.params
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": job.response_id,
        "object": "response",
        "created_at": job.created_at,
        "status": status,
        "background": body.background,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "model": job.chat.model,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": body.reasoning or {"effort": None, "summary": None},
        "store": body.store,
        "temperature": params.temperature,
        "text": body.text or {"format": {"type": "text"}},
        "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [],
        "top_logprobs": body.top_logprobs,
        "top_p": params.top_p,
        "truncation": body.truncation,
        "usage": usage,
        "user": body.user,
    }


def _usage(frontend: Frontend, job: ResponseJob, out: RequestOutput, reasoning: str) -> dict[str, Any]:
    output_tokens = len(out.token_ids)
    return {
        "input_tokens": len(job.chat.prompt),
        "input_tokens_details": {"cached_tokens": out.metrics.num_cached_tokens, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": _reasoning_tokens(frontend, job, out, reasoning)},
        "total_tokens": len(job.chat.prompt) + output_tokens,
    }


def _reasoning_tokens(frontend: Frontend, job: ResponseJob, out: RequestOutput, reasoning: str) -> int:
    """The output tokens up to and including the end of the thinking (its end tag's tokens): all
    of them where it never ended, none where there was none."""
    if job.chat.reasoning is None:
        return 0
    end = frontend.tokenizer.encode(job.chat.reasoning.end, add_special_tokens=False)
    tokens = out.token_ids
    for start in range(len(tokens) - len(end) + 1):
        if end and tokens[start : start + len(end)] == end:
            return start + len(end)
    return len(tokens) if reasoning else 0


def _logprobs(frontend: Frontend, entries: list[TokenLogprobs]) -> list[dict[str, Any]]:
    return [entry.model_dump() for entry in chat_logprobs(frontend.tokenizer, entries).content or []]


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_part(text: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if status != "in_progress" else []
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def _message_item(item_id: str, text: str, logprobs: list[dict[str, Any]], status: str) -> dict[str, Any]:
    content = [_text_part(text, logprobs)] if status != "in_progress" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(item_id: str, call: ParsedToolCall, status: str) -> dict[str, Any]:
    arguments = call.arguments if status != "in_progress" else ""
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call.id,
        "name": call.name,
        "arguments": arguments,
        "status": status,
    }


class _EventWriter:
    """Server-sent events named by their type, numbered in the order they are sent. A whole
    (not streamed) response sends none: ``streaming`` false writes nothing, serialises nothing."""

    def __init__(self, streaming: bool = True) -> None:
        self.sequence_number = 0
        self.streaming = streaming

    def event(self, kind: str, **fields: Any) -> str:
        self.sequence_number += 1
        if not self.streaming:
            return ""
        payload = {"type": kind, "sequence_number": self.sequence_number - 1, **fields}
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"


class _StreamedItems:
    """The answer's output items as they stream: one text item (reasoning or message) open at a
    time, closed when the other kind begins, a call arrives, or the answer ends. A message's
    log-probabilities are all the answer's tokens', as a whole response's are: those of tokens
    before its first text go out with that text."""

    def __init__(self, events: _EventWriter) -> None:
        self.events = events
        self.output: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._text: list[str] = []
        self._logprobs: list[dict[str, Any]] = []
        self._pending_logprobs: list[dict[str, Any]] = []

    def feed(self, shaped: ShapedText, logprobs: list[dict[str, Any]]) -> list[str]:
        self._pending_logprobs += logprobs
        sent = []
        if shaped.reasoning:
            sent += self._append("reasoning", shaped.reasoning)
        if shaped.content:
            sent += self._append("message", shaped.content)
        if shaped.calls:
            sent += self._close("completed")
            for call in shaped.calls:
                sent += self._call(call)
        return sent

    def finish(self, status: str) -> list[str]:
        """Close the open item with the answer's status; an answer of nothing is an empty message."""
        if self._open is None and not self.output:
            return self._append("message", "") + self._close(status)
        return self._close(status)

    def _append(self, kind: str, text: str) -> list[str]:
        sent = []
        if self._open is None or self._open["type"] != kind:
            sent += self._close("completed")
            sent += self._start(kind)
        assert self._open is not None
        self._text.append(text)
        where = {"item_id": self._open["id"], "output_index": len(self.output), "content_index": 0}
        if kind == "reasoning":
            sent.append(self.events.event("response.reasoning_text.delta", **where, delta=text))
        else:
            logprobs, self._pending_logprobs = self._pending_logprobs, []
            self._logprobs += logprobs
            sent.append(
                self.events.event("response.output_text.delta", **where, delta=text, logprobs=logprobs)
            )
        return sent

    def _start(self, kind: str) -> list[str]:
        if kind == "reasoning":
            self._open = _reasoning_item(_item_id("rs"), "", "in_progress")
            part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
        else:
            self._open = _message_item(_item_id("msg"), "", [], "in_progress")
            part = _text_part("", [])
        where = {"output_index": len(self.output)}
        return [
            self.events.event("response.output_item.added", **where, item=self._open),
            self.events.event(
                "response.content_part.added", **where, item_id=self._open["id"], content_index=0, part=part
            ),
        ]

    def _close(self, status: str) -> list[str]:
        if self._open is None:
            return []
        item_id, text = self._open["id"], "".join(self._text)
        where = {"item_id": item_id, "output_index": len(self.output), "content_index": 0}
        if self._open["type"] == "reasoning":
            item = _reasoning_item(item_id, text, status)
            sent = [self.events.event("response.reasoning_text.done", **where, text=text)]
        else:
            self._logprobs += self._pending_logprobs
            self._pending_logprobs = []
            item = _message_item(item_id, text, self._logprobs, status)
            sent = [
                self.events.event("response.output_text.done", **where, text=text, logprobs=self._logprobs)
            ]
        sent.append(self.events.event("response.content_part.done", **where, part=item["content"][0]))
        sent.append(self.events.event("response.output_item.done", output_index=len(self.output), item=item))
        self.output.append(item)
        self._open, self._text, self._logprobs = None, [], []
        return sent

    def _call(self, call: ParsedToolCall) -> list[str]:
        item_id, index = _item_id("fc"), len(self.output)
        item = _call_item(item_id, call, "completed")
        self.output.append(item)
        return [
            self.events.event(
                "response.output_item.added",
                output_index=index,
                item=_call_item(item_id, call, "in_progress"),
            ),
            self.events.event(
                "response.function_call_arguments.delta",
                item_id=item_id,
                output_index=index,
                delta=call.arguments,
            ),
            self.events.event(
                "response.function_call_arguments.done",
                item_id=item_id,
                output_index=index,
                name=call.name,
                arguments=call.arguments,
            ),
            self.events.event("response.output_item.done", output_index=index, item=item),
        ]
