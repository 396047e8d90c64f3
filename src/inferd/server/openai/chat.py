"""`POST /v1/chat/completions`: messages through the chat template -> response or SSE chunks."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

from inferd.engine.outputs import RequestOutput
from inferd.engine.tokenizer import Tokenizer
from inferd.sample.sampler import TokenLogprobs
from inferd.sampling_params import SamplingParams, SamplingParamsError
from inferd.server.errors import ApiError, InvalidRequestError
from inferd.server.forced_tool_calls import ForcedCalls, forced_calls
from inferd.server.frontend import Frontend
from inferd.server.openai.beam_search import check_beam_request, run_beam_search
from inferd.server.openai.chat_answer import AnswerShaper
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
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    TokenizeRequest,
    ToolCall,
    TopLogprob,
    Usage,
)
from inferd.server.openai.token_logprobs import prompt_logprobs, token_name
from inferd.server.reasoning import ReasoningFormat, prompt_closes_thinking
from inferd.server.streaming import SSE_DONE, sse_event
from inferd.server.tool_calls import TOOL_CALL_PARSERS, ParsedToolCall
from inferd.structured.spec import StructuredOutput


@dataclass
class ChatJob:
    request_id: str  # the engine requests' (the server's own, unique)
    model: str
    prompt: list[int]
    params: SamplingParams
    n: int
    want_logprobs: bool
    include_usage: bool
    # Every chunk carries the usage so far (vLLM's continuous_usage_stats).
    continuous_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    timeout_s: float | None = None  # None: the server's default
    # How to split the thinking from the answer (--reasoning-parser); None: all of it is content.
    reasoning: ReasoningFormat | None = None
    # vLLM's include_reasoning: false leaves the thinking out of the answer.
    include_reasoning: bool = True
    # The --tool-call-parser that reads the answer's calls (the request offered tools); None:
    # none read. With parallel_tool_calls false, the first call only.
    tool_parser: str | None = None
    one_call: bool = False
    # tool_choice "required" or a named function: the answer is the calls' JSON, read as such.
    forced: ForcedCalls | None = None
    # Set: a beam search (server/openai/beam_search.py) ranking finished beams with this penalty.
    length_penalty: float | None = None
    # vLLM's return_token_ids: the conversation's and each choice's token ids in the answer.
    return_token_ids: bool = False
    # vLLM's prompt_logprobs: the conversation's, with this many alternatives, in a whole answer.
    prompt_logprobs: int | None = None
    # vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:N".
    tokens_as_ids: bool = False
    # The answer's id: the client's own under the route's prefix where it gave one (the
    # X-Request-Id header, or the body's request_id: server/request_id.py); empty: request_id.
    response_id: str = ""

    def __post_init__(self) -> None:
        self.response_id = self.response_id or self.request_id

    def token_ids(self, tokens: Sequence[int]) -> list[int] | None:
        return list(tokens) if self.return_token_ids else None

    def shaper(self) -> AnswerShaper:
        structured = self.params.structured_output is not None
        return AnswerShaper(
            self.reasoning, self.tool_parser, self.one_call, self.forced, structured, self.include_reasoning
        )

    @property
    def calls_end_turn(self) -> bool:
        """Whether an answer of calls finishes with `tool_calls`: not for a named tool_choice,
        where OpenAI (and vLLM) say `stop`."""
        return self.forced is None or self.forced.function is None


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: role and plain-text content, an assistant turn's
    tool calls (arguments as an object, which templates such as Qwen's write out as JSON) and its
    `reasoning_content`, and a tool turn's call id."""
    rendered = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.text()}
        if message.name is not None:
            item["name"] = message.name
        if message.tool_calls:
            item["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)}}
                for call in message.tool_calls
            ]  # fmt: skip
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        thinking = message.reasoning_content if message.reasoning_content is not None else message.reasoning
        if thinking is not None:
            item["reasoning_content"] = thinking
        rendered.append(item)
    return rendered


def _arguments(text: str) -> Any:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # an integer past 4,300 digits is a plain ValueError
        return text
    return value if isinstance(value, dict) else text


def _offered_tools(frontend: Frontend, body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools the template is to show the model; None where there are none to offer."""
    choice = body.tool_choice
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        shape = "'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}"
        raise InvalidRequestError(f"tool_choice: must be {shape}, got {choice!r}", "tool_choice")
    forcing = choice not in (None, "auto", "none")
    if "tools" not in body.model_fields_set and choice not in (None, "none"):
        # As OpenAI and vLLM: a tool choice is about the tools offered.
        raise InvalidRequestError("tool_choice: only allowed when tools are given", "tool_choice")
    if not body.tools or choice == "none":
        if forcing:
            raise InvalidRequestError("tool_choice: forcing a call needs tools", "tool_choice")
        return None
    if frontend.tool_call_parser is None and not forcing:
        # A forced call's answer is JSON made to the tools' schemas: no parser reads it.
        raise InvalidRequestError(
            f"tools: start the server with --tool-call-parser ({', '.join(TOOL_CALL_PARSERS)}) to use tools",
            "tools",
        )
    for index, tool in enumerate(body.tools):
        function = tool.get("function")
        named = isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"]
        if tool.get("type") != "function" or not named:
            shape = "{'type': 'function', 'function': {'name': ...}}"
            raise InvalidRequestError(f"tools: each tool must be {shape}", "tools")
        # Shown to the model as they are whatever the tool_choice: a schema must be an object then
        # too (a forced call also compiles it).
        if not isinstance(tool["function"].get("parameters") or {}, dict):  # null: no parameters
            raise InvalidRequestError(
                f"tools[{index}].function.parameters: must be a JSON Schema object", "tools"
            )
    return body.tools


def refuse_request_template(template: str | None) -> None:
    if template is not None:
        raise InvalidRequestError(
            "chat_template: a request's own template is not accepted; the server renders with the model's "
            "(or its --chat-template)",
            "chat_template",
        )


def render_conversation(
    frontend: Frontend, body: ChatCompletionRequest | TokenizeRequest, tools: list[dict[str, Any]] | None
) -> str:
    """The conversation's prompt text as the chat template renders it with the request's fields
    (``tools``: those offered, already checked)."""
    assert body.messages is not None
    variables = template_kwargs(
        body.chat_template_kwargs, body.messages, body.add_generation_prompt, body.continue_final_message
    )
    if tools is not None:
        variables = {**(variables or {}), "tools": tools}
    if body.documents is not None:  # chat_template_kwargs' own `documents` win, as in vLLM
        variables = {"documents": body.documents, **(variables or {})}
    return frontend.render_chat(
        template_messages(body.messages), body.add_generation_prompt, variables, body.continue_final_message
    )


# Variables the server itself gives every chat template.
_TEMPLATE_VARIABLES = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token", "tools"})


def template_kwargs(
    kwargs: dict[str, Any] | None,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    continue_final_message: bool,
) -> dict[str, Any] | None:
    """The extra template variables (``chat_template_kwargs``), checked: the server's own are set
    by their fields, and a conversation is continued only from an assistant message, without a new
    turn after it."""
    taken = sorted(_TEMPLATE_VARIABLES & set(kwargs or {}))
    if taken:
        raise InvalidRequestError(
            f"chat_template_kwargs: {', '.join(taken)} are set by the server (or by their own fields)",
            "chat_template_kwargs",
        )
    if continue_final_message:
        if add_generation_prompt:
            raise InvalidRequestError(
                "continue_final_message: set add_generation_prompt to false with it", "continue_final_message"
            )
        if messages[-1].role != "assistant":
            raise InvalidRequestError(
                "continue_final_message: the last message must be the assistant's", "continue_final_message"
            )
    return kwargs


def output_budget(
    body: ChatCompletionRequest, defaults: Mapping[str, float | int], cap: int | None = None
) -> tuple[int | None, str]:
    """The request's output budget and the field that set it: `max_completion_tokens` wins over
    the older `max_tokens`; with neither, the model's generation_config.json `max_new_tokens`
    (`defaults["max_tokens"]`, within the server's `cap`, at least the request's `min_tokens`),
    else None: the rest of the context."""
    if body.max_completion_tokens is not None:
        return body.max_completion_tokens, "max_completion_tokens"
    if body.max_tokens is None and "max_tokens" in defaults:
        budget = max(int(defaults["max_tokens"]), body.min_tokens)
        return (budget if cap is None else min(budget, cap)), "max_tokens"
    return body.max_tokens, "max_tokens"


def prepare_chat(frontend: Frontend, body: ChatCompletionRequest, client_id: str | None = None) -> ChatJob:
    """Validate, render the template and tokenize; every error here is a 4xx before generation."""
    frontend.check_model(body.model)
    if body.use_beam_search:
        check_beam_request(body)
    if body.echo:
        raise InvalidRequestError("echo: not served for chat (a completion's echo is)", "echo")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequestError(
            "best_of: not served for chat (a completion's best_of is); each of the n choices is one sample",
            "best_of",
        )
    refuse_request_template(body.chat_template)
    tools = _offered_tools(frontend, body)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs: needs logprobs set to true", "top_logprobs")
    field_names = {"logprobs": "top_logprobs"}
    max_tokens, field_names["max_tokens"] = output_budget(
        body, frontend.sampling_defaults, frontend.max_tokens_cap
    )
    engine_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(frontend, body, max_tokens, engine_logprobs, field_names)
    forced = None
    if tools is not None and body.tool_choice not in (None, "auto"):
        forced, params = _force_calls(frontend, tools, body, params)
    if tools is not None and forced is None and params.skip_special_tokens:
        # Some models' <tool_call> is a special token: kept in the text, so the blocks can be read.
        params = dataclasses.replace(params, skip_special_tokens=False)
    prompt = render_conversation(frontend, body, tools)
    reasoning = frontend.reasoning_format
    # No thinking asked for (Qwen3's switch, as vLLM reads it), or the prompt closed it (the
    # template did, or a prefilled answer): none to split off, and a constraint holds from the start.
    if reasoning is not None and (
        (body.chat_template_kwargs or {}).get("enable_thinking") is False
        or prompt_closes_thinking(
            prompt, reasoning, body.messages[-1].text() if body.continue_final_message else None
        )
    ):
        reasoning = None
    structure = params.structured_output
    trigger = frontend.tokenizer.encode(reasoning.end, add_special_tokens=False) if reasoning else []
    if structure is not None and trigger:
        # The model thinks freely first: the constraint (a forced call's too) starts after the
        # thinking's end tag, as vLLM's reasoning-aware structured outputs do.
        params = dataclasses.replace(
            params, structured_output=dataclasses.replace(structure, starts_after=trigger)
        )
    # The template writes the special tokens it wants (a BOS among them): none added again unless
    # the request asks (vLLM's add_special_tokens, false by default for chat).
    token_ids = frontend.tokenizer.encode(prompt, add_special_tokens=bool(body.add_special_tokens))
    if body.truncate_prompt_tokens is not None:
        token_ids = frontend.truncated(token_ids, body.truncate_prompt_tokens, params.max_tokens, "messages")
    if max_tokens is not None and body.max_tokens is None and body.max_completion_tokens is None:
        # The model's budget is a default, not the client's ask: where the context leaves less,
        # the context is the limit, as for a request without either.
        # (Never below min_tokens: a context too short for those is the prompt's error.)
        room = frontend.max_model_len - len(token_ids)
        params = dataclasses.replace(params, max_tokens=max(1, params.min_tokens, min(max_tokens, room)))
    request_id = frontend.new_request_id("chatcmpl")
    return ChatJob(
        request_id=request_id,
        response_id=f"chatcmpl-{client_id}" if client_id else request_id,
        model=frontend.answering_name(body.model),
        prompt=frontend.prepare(token_ids, params, "messages"),
        params=params,
        n=body.n,
        want_logprobs=body.logprobs,
        include_usage=body.include_usage_chunk,
        continuous_usage=body.continuous_usage,
        reasoning=reasoning,
        include_reasoning=body.include_reasoning,
        tool_parser=frontend.tool_call_parser if tools is not None and forced is None else None,
        one_call=not body.parallel_tool_calls,
        forced=forced,
        length_penalty=body.length_penalty if body.use_beam_search else None,
        return_token_ids=body.return_token_ids,
        prompt_logprobs=None if body.stream else body.prompt_logprobs,
        tokens_as_ids=body.return_tokens_as_token_ids,
    )


def _force_calls(
    frontend: Frontend, tools: list[dict[str, Any]], body: ChatCompletionRequest, params: SamplingParams
) -> tuple[ForcedCalls, SamplingParams]:
    """tool_choice "required" or a named function: the answer constrained to the calls' schema."""
    assert body.tool_choice is not None
    forced, schema = forced_calls(tools, body.tool_choice, one_call=not body.parallel_tool_calls)
    if params.structured_output is not None:
        raise InvalidRequestError(
            "tool_choice: a forced call cannot be combined with another structured output", "tool_choice"
        )
    try:
        constrained = dataclasses.replace(params, structured_output=StructuredOutput(json=json.dumps(schema)))
    except SamplingParamsError as exc:
        raise InvalidRequestError(
            f"tools: the tools' parameter schemas do not compile: {exc}", "tools"
        ) from exc
    assert constrained.structured_output is not None
    frontend.check_structured_output(constrained.structured_output, "tool_choice")
    return forced, constrained


async def chat(frontend: Frontend, job: ChatJob) -> ChatCompletionResponse:
    finals: dict[int, RequestOutput] = {}
    async with aclosing(
        frontend.generate(job.request_id, [job.prompt], job.params, job.n, job.timeout_s, scores_once=True)
    ) as stream:
        async for item in stream:
            if item.output.finished:
                finals[item.index] = item.output
    choices = []
    for index, out in sorted(finals.items()):
        message = _message(job, out.text)
        reason = finish_reason(out)
        choices.append(
            ChatChoice(
                index=index,
                message=message,
                logprobs=chat_logprobs(frontend.tokenizer, out.logprobs, job.tokens_as_ids)
                if job.want_logprobs
                else None,
                finish_reason="tool_calls"
                if message.tool_calls and reason == "stop" and job.calls_end_turn
                else reason,
                stop_reason=out.stop_reason,
                token_ids=job.token_ids(out.token_ids),
            )
        )
    return ChatCompletionResponse(
        id=job.response_id,
        created=job.created,
        model=job.model,
        choices=choices,
        usage=usage(
            len(job.prompt),
            sum(len(out.token_ids) for out in finals.values()),
            finals[0].metrics.num_cached_tokens,
        ),
        prompt_token_ids=job.token_ids(job.prompt),
        # As the first choice scored the conversation for all (``scores_once``).
        prompt_logprobs=prompt_logprobs(
            frontend.tokenizer, finals[0].prompt_logprobs, job.prompt_logprobs, job.tokens_as_ids
        ),
    )


async def beam_chat(frontend: Frontend, job: ChatJob) -> ChatCompletionResponse:
    """The ``job.n`` best beams as choices, best first, each read as ``chat`` reads an answer."""
    assert job.length_penalty is not None
    (answers,) = await run_beam_search(
        frontend, job.request_id, [job.prompt], job.params, job.n, job.length_penalty, job.timeout_s
    )
    choices = []
    for index, answer in enumerate(answers):
        message = _message(job, answer.text)
        ends_in_calls = message.tool_calls and answer.finish_reason == "stop" and job.calls_end_turn
        reason = "tool_calls" if ends_in_calls else answer.finish_reason
        token_ids = job.token_ids(answer.token_ids)
        choices.append(
            ChatChoice(index=index, message=message, logprobs=None, finish_reason=reason, token_ids=token_ids)
        )
    return ChatCompletionResponse(
        id=job.response_id,
        created=job.created,
        model=job.model,
        choices=choices,
        usage=usage(len(job.prompt), sum(len(answer.token_ids) for answer in answers)),
        prompt_token_ids=job.token_ids(job.prompt),
    )


def _chunk_event(
    job: ChatJob,
    choices: list[ChatChunkChoice],
    prompt_token_ids: list[int] | None = None,
    usage_so_far: Usage | None = None,
) -> str:
    body = ChatCompletionChunk(
        id=job.response_id,
        created=job.created,
        model=job.model,
        choices=choices,
        prompt_token_ids=prompt_token_ids,
        usage=usage_so_far,
    )
    return sse_event(body.model_dump_json())


def _role_chunk_event(job: ChatJob) -> str:
    """The stream's first chunk: each choice's role (and the conversation's tokens, where asked)."""
    role = DeltaMessage(role="assistant", content="")
    choices = [ChatChunkChoice(index=i, delta=role) for i in range(job.n)]
    nothing_yet = usage(len(job.prompt), 0) if job.continuous_usage else None
    return _chunk_event(job, choices, job.token_ids(job.prompt), nothing_yet)


async def stream_beam_chat(frontend: Frontend, job: ChatJob) -> AsyncIterator[str]:
    """A beam search streamed, as vLLM streams one: a role chunk per choice at once, then, once
    the search has ended, each beam whole as one delta (best first) with its finish reason, a
    usage chunk if asked, and [DONE]; an error is an error event."""
    yield _role_chunk_event(job)
    try:
        whole = await beam_chat(frontend, job)
        for choice in whole.choices:
            message = choice.message
            calls = [
                DeltaToolCall(
                    index=k,
                    id=call.id,
                    function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments),
                )
                for k, call in enumerate(message.tool_calls)
            ]
            delta = DeltaMessage(
                content=message.content, reasoning_content=message.reasoning_content, tool_calls=calls or None
            )
            reason = choice.finish_reason
            whole_beam = ChatChunkChoice(
                index=choice.index, delta=delta, finish_reason=reason, token_ids=choice.token_ids
            )
            so_far = whole.usage if job.continuous_usage else None  # the search has ended: all of it
            yield _chunk_event(job, [whole_beam], usage_so_far=so_far)
        if job.include_usage:
            last = ChatCompletionChunk(
                id=job.response_id, created=job.created, model=job.model, choices=[], usage=whole.usage
            )
            yield sse_event(last.model_dump_json())
    except ApiError as exc:
        yield sse_event(error_event_payload(exc))
    yield SSE_DONE


async def stream_chat(frontend: Frontend, job: ChatJob) -> AsyncGenerator[str, None]:
    """SSE events: a role chunk per choice, content deltas, a usage chunk if asked, then [DONE]."""
    num_tokens: dict[int, int] = {}
    ids_sent: dict[int, int] = {}  # with return_token_ids: each choice's tokens already sent
    cached = 0  # the first choice's prefix-cache hits
    shapers = {i: job.shaper() for i in range(job.n)}
    # The role chunk goes out with the first output: an error before it (a full queue, found as
    # the requests are admitted) is raised, so started_sse_response answers with its status.
    sent = False
    try:
        stream = frontend.generate(job.request_id, [job.prompt], job.params, job.n, job.timeout_s)
        async with aclosing(stream):
            async for item in stream:
                if not sent:
                    sent = True
                    yield _role_chunk_event(job)
                out = item.output
                num_tokens[item.index] = len(out.token_ids)
                if item.index == 0:
                    cached = out.metrics.num_cached_tokens
                reason: Literal["stop", "length", "tool_calls", "timeout"] | None = stream_finish_reason(out)
                logprobs = (
                    chat_logprobs(frontend.tokenizer, out.new_logprobs, job.tokens_as_ids)
                    if job.want_logprobs
                    else None
                )
                shaper = shapers[item.index]
                shaped = shaper.feed(out.new_text, out.finished)
                first = shaper.calls_sent - len(shaped.calls)
                calls = [DeltaToolCall(index=first + k, id=c.id, function=DeltaFunctionCall(name=c.name,
                         arguments=c.arguments)) for k, c in enumerate(shaped.calls)]  # fmt: skip
                if reason == "stop" and shaper.calls_sent and job.calls_end_turn:
                    reason = "tool_calls"
                content, reasoning = shaped.content, shaped.reasoning
                if content or reasoning or calls or reason is not None or logprobs is not None:
                    delta = DeltaMessage(
                        content=content or None, reasoning_content=reasoning or None, tool_calls=calls or None
                    )
                    choice = ChatChunkChoice(
                        index=item.index,
                        delta=delta,
                        logprobs=logprobs,
                        finish_reason=reason,
                        stop_reason=out.stop_reason,
                    )
                    if job.return_token_ids:  # with the tokens of the chunks held back before it
                        choice.token_ids = list(out.token_ids[ids_sent.get(item.index, 0) :])
                        ids_sent[item.index] = len(out.token_ids)
                    so_far = (
                        usage(len(job.prompt), sum(num_tokens.values()), cached)
                        if job.continuous_usage
                        else None
                    )
                    yield _chunk_event(job, [choice], usage_so_far=so_far)
        if job.include_usage:
            last = ChatCompletionChunk(
                id=job.response_id,
                created=job.created,
                model=job.model,
                choices=[],
                usage=usage(len(job.prompt), sum(num_tokens.values()), cached),
            )
            yield sse_event(last.model_dump_json())
    except ApiError as exc:
        if not sent:
            raise
        yield sse_event(error_event_payload(exc))
    yield SSE_DONE


def _message(job: ChatJob, text: str) -> AssistantMessage:
    shaped = job.shaper().feed(text, finished=True)
    return AssistantMessage(
        content=None if shaped.calls and not shaped.content else shaped.content,
        reasoning_content=shaped.reasoning or None,
        tool_calls=[_tool_call(call) for call in shaped.calls],
    )


def _tool_call(call: ParsedToolCall) -> ToolCall:
    return ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


def chat_logprobs(
    tokenizer: Tokenizer, entries: list[TokenLogprobs], tokens_as_ids: bool = False
) -> ChatChoiceLogprobs:
    """`tokens_as_ids`: tokens named "token_id:N"; their `bytes` stay the token's own."""

    def top(token_id: int, logprob: float) -> TopLogprob:
        name = token_name(tokenizer, token_id, tokens_as_ids)
        return TopLogprob(token=name, logprob=logprob, bytes=list(tokenizer.token_bytes(token_id)))

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
