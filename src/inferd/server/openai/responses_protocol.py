"""OpenAI's Responses API (`POST /v1/responses`): the request body, and its input items and tools
read as the chat completions' messages and tools, which the chat path then serves.

Follows the API reference for text models: input as a string or a list of items (messages with
text parts, function calls and their outputs; reasoning items are dropped, as chat templates drop
earlier thinking), `instructions`, function tools and `tool_choice`, `text.format` (JSON object or
JSON schema), `max_output_tokens`, `top_logprobs`, `store`, `previous_response_id` and `background`
(streamed or polled). What a text model cannot honour (images, files, built-in tools, automatic
truncation) is refused by name rather than ignored.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import Field, model_validator

from inferd.server.errors import InvalidRequestError
from inferd.server.openai.protocol import _Body
from inferd.writable import first_unwritable

# `include` entry that asks for the output text's log-probabilities.
INCLUDE_LOGPROBS = "message.output_text.logprobs"


class ResponsesRequest(_Body):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    include: list[str] | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled", "auto"] = "disabled"
    background: bool = False
    # Declared to be refused: each would change what the model is asked.
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: int | None = None
    # Extras the chat endpoint takes too (vLLM's names), and inferd's per-request timeout.
    seed: int | None = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = None
    priority: int = 0
    cache_salt: str | None = Field(None, min_length=1)
    timeout: float | None = Field(None, gt=0.0, le=86400.0)

    @model_validator(mode="before")
    @classmethod
    def _writable(cls, data: Any) -> Any:
        """A response echoes much of its request (input items, tools, metadata, text format,
        user): a value it could not write back is refused here, not a 500 at the answer."""
        where = first_unwritable(data, "body") if isinstance(data, dict) else None
        if where is not None:
            raise ValueError(
                f"{where}: holds a lone surrogate (\\ud800) or a number JSON cannot hold (NaN, Infinity)"
            )
        return data

    @property
    def wants_logprobs(self) -> bool:
        return self.top_logprobs is not None or INCLUDE_LOGPROBS in (self.include or [])

    def refuse_unsupported(self) -> None:
        """Options that would change the answer and that a text model served here cannot honour."""
        if self.background and not self.store:
            raise InvalidRequestError(
                "background: a background response must be stored (store: true)", "background"
            )
        if self.truncation == "auto":
            raise InvalidRequestError(
                "truncation: 'auto' is not supported; a conversation longer than the context is an error",
                "truncation",
            )
        unknown = sorted(set(self.include or []) - {INCLUDE_LOGPROBS})
        if unknown:
            raise InvalidRequestError(f"include: {', '.join(unknown)} cannot be included here", "include")
        for name in ("conversation", "prompt", "max_tool_calls"):
            if getattr(self, name) is not None:
                raise InvalidRequestError(f"{name}: not supported by this server", name)
        metadata = self.metadata or {}
        # OpenAI's limits: the server keeps metadata with every stored response.
        if len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
            raise InvalidRequestError(
                "metadata: at most 16 pairs, keys up to 64 characters and values up to 512", "metadata"
            )


def input_messages(items: str | list[dict[str, Any]], field: str = "input") -> list[dict[str, Any]]:
    """Input items as chat messages: text messages, function calls (one assistant turn per run of
    them, after its text if any) and their outputs (tool turns); reasoning items are dropped."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        where = f"{field}[{index}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise InvalidRequestError(
                    f"{where}.role: must be user, system, developer or assistant", field
                )
            messages.append({"role": role, "content": _text(item.get("content"), f"{where}.content", field)})
        elif kind == "function_call":
            call = {
                "id": _string(item, "call_id", where, field),
                "type": "function",
                "function": {
                    "name": _string(item, "name", where, field),
                    "arguments": _string(item, "arguments", where, field),
                },
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, f"{where}.output", field)
            messages.append(
                {"role": "tool", "tool_call_id": _string(item, "call_id", where, field), "content": text}
            )
        elif kind != "reasoning":
            raise InvalidRequestError(f"{where}.type: {kind!r} items are not supported", field)
    return messages


# Each kind of item's id prefix, as the API writes them.
_ITEM_ID_PREFIXES = {
    "message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"
}  # fmt: skip


def listed_input_items(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items (checked by ``input_messages`` first) as ``GET /v1/responses/{id}/input_items``
    lists them: each with its type and an id (the client's, or a new one), a message's text as
    content parts (``input_text``, an assistant's ``output_text``)."""
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    listed = []
    for given in items:
        item = dict(given)
        kind = item.setdefault("type", "message")
        if kind == "message":
            if isinstance(item.get("content"), str):
                part = "output_text" if item.get("role") == "assistant" else "input_text"
                item["content"] = [{"type": part, "text": item["content"]}]
            item.setdefault("status", "completed")
        item.setdefault("id", f"{_ITEM_ID_PREFIXES.get(kind, 'item')}_{uuid.uuid4().hex}")
        listed.append(item)
    return listed


def _string(item: dict[str, Any], key: str, where: str, field: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise InvalidRequestError(f"{where}.{key}: must be a string", field)
    return value


# Content parts that carry text; any other (images, files, audio) is refused.
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


def _text(content: Any, where: str, field: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where}: must be a string or a list of content parts", field)
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        elif isinstance(kind, str) and kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise InvalidRequestError(
                f"{where}[{index}]: {kind!r} parts are not supported; this model takes text", field
            )
    return "".join(texts)


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Function tools in the chat endpoint's nested form (``{"type": "function", "function":
    {...}}``); the built-in tools (web search, files, code) are not available here."""
    if tools is None:
        return None
    converted = []
    for index, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise InvalidRequestError(f"tools[{index}]: only function tools are supported", "tools")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise InvalidRequestError(f"tools[{index}].name: must be a non-empty string", "tools")
        if not isinstance(tool.get("parameters") or {}, dict):  # null (the SDK's type allows it): none
            raise InvalidRequestError(f"tools[{index}].parameters: must be a JSON Schema object", "tools")
        function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool}
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequestError(
        "tool_choice: must be auto, none, required or {'type': 'function', 'name': ...}", "tool_choice"
    )


def chat_response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` as the chat endpoint's ``response_format``."""
    fmt = (text or {}).get("format")
    if fmt is None or fmt == {"type": "text"}:
        return None
    if not isinstance(fmt, dict):
        raise InvalidRequestError("text.format: must be an object", "text")
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequestError("text.format.type: must be text, json_object or json_schema", "text")
