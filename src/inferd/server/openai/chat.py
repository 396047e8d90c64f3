"""`POST /v1/chat/completions`: messages through the chat template -> response or SSE chunks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from inferd.engine.outputs import RequestOutput
from inferd.engine.tokenizer import Tokenizer
from inferd.sample.sampler import TokenLogprobs
from inferd.sampling_params import SamplingParams
from inferd.server.errors import ApiError, InvalidRequestError
from inferd.server.frontend import Frontend
from inferd.server.openai.common import (
    error_event_payload,
    finish_reason,
    sampling_params,
    stream_finish_reason,
    usage,
)
from inferd.server.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
)
from inferd.server.reasoning import ReasoningFormat, ReasoningSplitter, split_reasoning
from inferd.server.streaming import SSE_DONE, sse_event


@dataclass
class ChatJob:
    request_id: str
    model: str
    prompt: list[int]
    params: SamplingParams
    n: int
    want_logprobs: bool
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))
    timeout_s: float | None = None  # None: the server's default
    # How to split the thinking from the answer (--reasoning-parser); None: all of it is content.
    reasoning: ReasoningFormat | None = None


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: role and plain-text content."""
    rendered = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.text()}
        if message.name is not None:
            item["name"] = message.name
        rendered.append(item)
    return rendered


# Variables the server itself gives every chat template.
_TEMPLATE_VARIABLES = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token"})


def _template_kwargs(body: ChatCompletionRequest) -> dict[str, Any] | None:
    """The extra template variables, checked: the server's own are set by their fields, and a
    conversation is continued only from an assistant message, without a new turn after it."""
    kwargs = body.chat_template_kwargs
    taken = sorted(_TEMPLATE_VARIABLES & set(kwargs or {}))
    if taken:
        raise InvalidRequestError(
            f"chat_template_kwargs: {', '.join(taken)} are set by the server (or by their own fields)",
            "chat_template_kwargs",
        )
    if body.continue_final_message:
        if body.add_generation_prompt:
            raise InvalidRequestError(
                "continue_final_message: set add_generation_prompt to false with it", "continue_final_message"
            )
        if body.messages[-1].role != "assistant":
            raise InvalidRequestError(
                "continue_final_message: the last message must be the assistant's", "continue_final_message"
            )
    return kwargs


def prepare_chat(frontend: Frontend, body: ChatCompletionRequest) -> ChatJob:
    """Validate, render the template and tokenize; every error here is a 4xx before generation."""
    frontend.check_model(body.model)
    if body.tools:
        raise InvalidRequestError("tools: tool calling is not supported", "tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise InvalidRequestError("response_format: only {'type': 'text'} is supported", "response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs: needs logprobs set to true", "top_logprobs")
    field_names = {"logprobs": "top_logprobs"}
    max_tokens = body.max_tokens
    if body.max_completion_tokens is not None:  # the newer name wins, and errors name it
        max_tokens = body.max_completion_tokens
        field_names["max_tokens"] = "max_completion_tokens"
    engine_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(frontend, body, max_tokens, engine_logprobs, field_names)
    prompt = frontend.render_chat(
        template_messages(body.messages),
        body.add_generation_prompt,
        _template_kwargs(body),
        body.continue_final_message,
    )
    return ChatJob(
        request_id=frontend.new_request_id("chatcmpl"),
        model=frontend.model_name,
        prompt=frontend.prepare(prompt, params, field="messages"),
        params=params,
        n=body.n,
        want_logprobs=body.logprobs,
        include_usage=body.include_usage_chunk,
        reasoning=frontend.reasoning_format,
    )


async def chat(frontend: Frontend, job: ChatJob) -> ChatCompletionResponse:
    finals: dict[int, RequestOutput] = {}
    async with aclosing(
        frontend.generate(job.request_id, [job.prompt], job.params, job.n, job.timeout_s)
    ) as stream:
        async for item in stream:
            if item.output.finished:
                finals[item.index] = item.output
    choices = [
        ChatChoice(
            index=index,
            message=_message(job, out.text),
            logprobs=_logprobs(frontend.tokenizer, out.logprobs) if job.want_logprobs else None,
            finish_reason=finish_reason(out),
        )
        for index, out in sorted(finals.items())
    ]
    return ChatCompletionResponse(
        id=job.request_id,
        created=job.created,
        model=job.model,
        choices=choices,
        usage=usage(len(job.prompt), sum(len(out.token_ids) for out in finals.values())),
    )


async def stream_chat(frontend: Frontend, job: ChatJob) -> AsyncIterator[str]:
    """SSE events: a role chunk per choice, content deltas, a usage chunk if asked, then [DONE]."""

    def chunk(choices: list[ChatChunkChoice]) -> str:
        body = ChatCompletionChunk(id=job.request_id, created=job.created, model=job.model, choices=choices)
        return sse_event(body.model_dump_json())

    num_tokens: dict[int, int] = {}
    splitters = {i: ReasoningSplitter(job.reasoning) for i in range(job.n)} if job.reasoning else {}
    try:
        stream = frontend.generate(job.request_id, [job.prompt], job.params, job.n, job.timeout_s)
        yield chunk(
            [ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(job.n)]
        )
        async with aclosing(stream):
            async for item in stream:
                out = item.output
                num_tokens[item.index] = len(out.token_ids)
                reason = stream_finish_reason(out)
                logprobs = _logprobs(frontend.tokenizer, out.new_logprobs) if job.want_logprobs else None
                reasoning, content = "", out.new_text
                if splitters:
                    splitter = splitters[item.index]
                    reasoning, content = splitter.feed(content)
                    if out.finished:  # a held-back tail that never became a tag is text
                        rest_reasoning, rest_content = splitter.finish()
                        reasoning, content = reasoning + rest_reasoning, content + rest_content
                if content or reasoning or reason is not None or logprobs is not None:
                    delta = DeltaMessage(content=content or None, reasoning_content=reasoning or None)
                    yield chunk(
                        [
                            ChatChunkChoice(
                                index=item.index, delta=delta, logprobs=logprobs, finish_reason=reason
                            )
                        ]
                    )
        if job.include_usage:
            last = ChatCompletionChunk(
                id=job.request_id,
                created=job.created,
                model=job.model,
                choices=[],
                usage=usage(len(job.prompt), sum(num_tokens.values())),
            )
            yield sse_event(last.model_dump_json())
    except ApiError as exc:
        yield sse_event(error_event_payload(exc))
    yield SSE_DONE


def _message(job: ChatJob, text: str) -> AssistantMessage:
    if job.reasoning is None:
        return AssistantMessage(content=text)
    reasoning, content = split_reasoning(job.reasoning, text)
    return AssistantMessage(content=content, reasoning_content=reasoning)


def _logprobs(tokenizer: Tokenizer, entries: list[TokenLogprobs]) -> ChatChoiceLogprobs:
    def top(token_id: int, logprob: float) -> TopLogprob:
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        return TopLogprob(token=text, logprob=logprob, bytes=list(tokenizer.token_bytes(token_id)))

    content = []
    for entry in entries:
        chosen = top(entry.token_id, entry.logprob)
        content.append(
            ChatTokenLogprob(
                token=chosen.token,
                logprob=chosen.logprob,
                bytes=chosen.bytes,
                top_logprobs=[top(t, lp) for t, lp in entry.top],
            )
        )
    return ChatChoiceLogprobs(content=content)
