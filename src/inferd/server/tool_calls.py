"""Tool calls in a model's answer (`--tool-call-parser`), read into OpenAI `tool_calls`; the text
around them stays `content`. One reader serves whole answers and stream deltas alike:

- `hermes`: the `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks that Qwen2.5,
  Qwen3 and Hermes models write, anywhere in the answer. Text outside a block goes out as it comes
  (a tail that could begin `<tool_call>` is held until it is known), and a call goes out once its
  block is closed, whole. A block whose JSON is not a call (no name, or not JSON) is left in the
  content, as written.
- `llama3_json`: Llama 3.1-3.3's calls, an answer that is a JSON object `{"name": ...,
  "parameters": {...}}` (several separated by `;`), after an optional `<|python_tag|>`.
- `pythonic`: Llama 3.2 and 4's calls, an answer that is a Python list of calls with keyword
  arguments, `[get_weather(city="Paris"), ...]` (Llama 4 puts it between `<|python_start|>` and
  `<|python_end|>`).
- `mistral`: Mistral's calls after the `[TOOL_CALLS]` token, as a JSON array of `{"name",
  "arguments"}` (older tokenizers) or as `name[ARGS]{...}` pieces (newer ones), each call's id nine
  letters and digits, as Mistral's chat template requires of the ids sent back with the results.

The last three are read once the answer is whole (a stream's calls come with its last delta); an
answer that begins otherwise streams as content, and one that turns out not to be calls is content,
as written.
"""

from __future__ import annotations

import ast
import json
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from inferd.server.reasoning import prefix_overlap
from inferd.writable import is_writable_text

START, END = "<tool_call>", "</tool_call>"
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "pythonic")
MISTRAL_CALLS, MISTRAL_ARGS, MISTRAL_CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
# What a function's name may be (OpenAI's: letters, digits, underscores and dashes, with dots):
# text before `{` that is not one is no call.
_FUNCTION_NAME = re.compile(r"[A-Za-z_][\w.\-]{0,63}")
# Python source longer than this is not read as calls (the parser's memory grows with nesting).
_MAX_PYTHONIC_CHARS = 100_000
# What reading a text as JSON or Python may raise besides a syntax error: a number too long to
# convert, nesting too deep, a value JSON cannot hold (NaN, infinity).
_UNREADABLE = (ValueError, RecursionError, MemoryError, OverflowError, TypeError)


@dataclass(frozen=True)
class ParsedToolCall:
    id: str
    name: str
    # The arguments as a JSON object's text, as OpenAI sends them.
    arguments: str


def _call(block: str) -> ParsedToolCall | None:
    try:
        value = json.loads(block)
    except _UNREADABLE:
        return None
    return _call_of(value, needs_arguments=False)


def _call_of(
    value: Any, new_id: Callable[[], str] | None = None, needs_arguments: bool = True
) -> ParsedToolCall | None:
    """A `{"name": ..., "arguments" (or "parameters"): {...}}` object as a call; None otherwise
    (an answer that is some other JSON object, `{"name": "Alice", "age": 30}` say, is no call:
    without ``needs_arguments``, a hermes block's, arguments may be left out)."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    if needs_arguments and "arguments" not in value and "parameters" not in value:
        return None
    arguments: Any = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, (dict, str)):
        return None
    try:  # strict JSON: NaN and infinities are no JSON a client could read
        text = (
            arguments
            if isinstance(arguments, str)
            else json.dumps(arguments, ensure_ascii=False, allow_nan=False)
        )
    except _UNREADABLE:
        return None
    if not (is_writable_text(value["name"]) and is_writable_text(text)):
        return None  # a JSON escape of a lone surrogate (\ud800): no answer could carry it
    return ParsedToolCall((new_id or new_call_id)(), value["name"], text)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def mistral_call_id() -> str:
    return "".join(random.choices(string.ascii_letters + string.digits, k=9))


class ToolCallReader(Protocol):
    """Feed an answer's text in order; each call returns the (content, calls) it settles, and
    `finish` those left at the end."""

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]: ...

    def finish(self) -> tuple[str, list[ParsedToolCall]]: ...


def tool_call_reader(parser: str) -> ToolCallReader:
    if parser == "hermes":
        return HermesReader()
    if parser == "llama3_json":
        return LeadingCallsReader(("{", "<|python_tag|>"), _llama3_json_calls)
    if parser == "pythonic":
        return LeadingCallsReader(("[", "<|python_start|>"), _pythonic_calls)
    if parser == "mistral":
        return MistralReader()
    raise ValueError(f"unknown tool call parser {parser!r}; choose one of {', '.join(TOOL_CALL_PARSERS)}")


class HermesReader:
    """`<tool_call>` blocks anywhere in the answer."""

    def __init__(self) -> None:
        self._held = ""  # outside a block: a tail that may begin one; inside: the block so far
        self._inside = False

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        text = self._held + text
        self._held = ""
        content: list[str] = []
        calls: list[ParsedToolCall] = []
        while text:
            if self._inside:
                at = text.find(END)
                if at < 0:
                    self._held = text
                    break
                block, text = text[:at], text[at + len(END) :]
                self._inside = False
                call = _call(block)
                if call is None:
                    content.append(START + block + END)
                else:
                    calls.append(call)
                continue
            at = text.find(START)
            if at >= 0:
                content.append(text[:at])
                text = text[at + len(START) :]
                self._inside = True
                continue
            keep = prefix_overlap(text, START)
            content.append(text[: len(text) - keep])
            self._held = text[len(text) - keep :]
            break
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        """The text held at the end: an unclosed block stays content, as written."""
        held, self._held = self._held, ""
        return (START + held if self._inside else held), []


class LeadingCallsReader:
    """An answer that is calls from its first character (`starts`: what such an answer begins
    with, after any spaces), read by `parse` once whole; any other answer goes out as it comes."""

    def __init__(self, starts: tuple[str, ...], parse: Callable[[str], list[ParsedToolCall] | None]) -> None:
        self._starts = starts
        self._parse = parse
        self._held = ""
        self._calls: bool | None = None  # None: not yet known

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        if self._calls is False:
            return text, []
        self._held += text
        if self._calls is None:
            begun = self._held.lstrip()
            if any(begun.startswith(start) for start in self._starts):
                self._calls = True
            elif begun and not any(start.startswith(begun) for start in self._starts):
                self._calls = False
                held, self._held = self._held, ""
                return held, []
        return "", []

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        held, self._held = self._held, ""
        calls = self._parse(held) if self._calls else None
        return ("", calls) if calls else (held, [])


class MistralReader:
    """Content up to `[TOOL_CALLS]`, then calls, read once the answer is whole."""

    def __init__(self) -> None:
        self._held = ""
        self._calls = False

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        text = self._held + text
        if self._calls:
            self._held = text
            return "", []
        at = text.find(MISTRAL_CALLS)
        if at >= 0:
            self._calls, self._held = True, text[at:]
            return text[:at], []
        keep = prefix_overlap(text, MISTRAL_CALLS)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], []

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        held, self._held = self._held, ""
        calls, after = _mistral_calls(held) if self._calls else (None, "")
        return (after, calls) if calls else (held, [])


def _json_objects(text: str, separators: str) -> list[Any] | None:
    """The JSON values `text` holds one after another (``separators`` and spaces between them)."""
    decoder, at = json.JSONDecoder(), 0
    values: list[Any] = []
    while True:
        while at < len(text) and (text[at].isspace() or text[at] in separators):
            at += 1
        if at == len(text):
            return values or None
        try:
            value, at = decoder.raw_decode(text, at)
        except _UNREADABLE:
            return None
        values.append(value)


def _all_calls(
    values: list[Any] | None, new_id: Callable[[], str] | None = None
) -> list[ParsedToolCall] | None:
    calls = [_call_of(value, new_id) for value in values or []]
    return calls if calls and all(call is not None for call in calls) else None  # type: ignore[return-value]


def _llama3_json_calls(text: str) -> list[ParsedToolCall] | None:
    return _all_calls(_json_objects(text.strip().removeprefix("<|python_tag|>"), ";"))


def _pythonic_calls(text: str) -> list[ParsedToolCall] | None:
    """`[f(a=1, b="x"), g()]`: calls by name with literal keyword arguments."""
    source = text.strip().removeprefix("<|python_start|>").removesuffix("<|python_end|>").strip()
    if len(source) > _MAX_PYTHONIC_CHARS:
        return None
    try:
        tree = ast.parse(source, mode="eval").body
    except (SyntaxError, *_UNREADABLE):
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
            return None
        try:
            arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
        except (SyntaxError, *_UNREADABLE):
            return None
        if len(arguments) != len(node.keywords):  # a **mapping
            return None
        call = _call_of({"name": node.func.id, "arguments": arguments})  # a set, bytes, an infinity: none
        if call is None:
            return None
        calls.append(call)
    return calls


def _mistral_calls(text: str) -> tuple[list[ParsedToolCall] | None, str]:
    """The calls after `[TOOL_CALLS]`, and the text after an array of them (content, as vLLM keeps
    it); no calls where the text is not calls of a name a function could have."""
    pieces = [piece.strip() for piece in text.split(MISTRAL_CALLS) if piece.strip()]
    if len(pieces) == 1 and pieces[0].startswith("["):  # [TOOL_CALLS][{...}, ...]
        try:
            listed, end = json.JSONDecoder().raw_decode(pieces[0])
        except _UNREADABLE:
            return None, ""
        after = pieces[0][end:].strip()
        return _all_calls(listed if isinstance(listed, list) else None, mistral_call_id), after
    calls = []
    for piece in pieces:  # [TOOL_CALLS]name[CALL_ID]id[ARGS]{...}, or name{...}: a call a piece
        head, found, arguments = piece.partition(MISTRAL_ARGS)
        if not found:  # the arguments' object right after the name
            brace = piece.find("{")
            head, arguments = (piece[:brace], piece[brace:]) if brace > 0 else (piece, "")
        name, has_id, call_id = head.partition(MISTRAL_CALL_ID)
        values = _json_objects(arguments, "")
        if not _FUNCTION_NAME.fullmatch(name.strip()) or values is None or len(values) != 1:
            return None, ""
        given = call_id.strip() if has_id else ""
        new_id = (lambda: given) if given else mistral_call_id  # noqa: B023 (called at once, below)
        call = _call_of({"name": name.strip(), "arguments": values[0]}, new_id)
        if call is None:
            return None, ""
        calls.append(call)
    return calls or None, ""
