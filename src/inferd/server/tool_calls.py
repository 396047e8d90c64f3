"""Tool calls in a model's answer (`--tool-call-parser hermes`): the `<tool_call>{"name": ...,
"arguments": {...}}</tool_call>` blocks that Qwen2.5, Qwen3 and Hermes models write, read into
OpenAI `tool_calls`; the text around them stays `content`.

As for the reasoning split, one reader serves whole answers and stream deltas: text outside a
block goes out as it comes (a tail that could begin `<tool_call>` is held until it is known), and
a call goes out once its block is closed, whole. A block whose JSON is not a call (no name, or not
JSON) is left in the content, as written.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from inferd.server.reasoning import prefix_overlap

START, END = "<tool_call>", "</tool_call>"
TOOL_CALL_PARSERS = ("hermes",)


@dataclass(frozen=True)
class ParsedToolCall:
    id: str
    name: str
    # The arguments as a JSON object's text, as OpenAI sends them.
    arguments: str


def _call(block: str) -> ParsedToolCall | None:
    try:
        value = json.loads(block)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments: Any = value.get("arguments", value.get("parameters", {}))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ParsedToolCall(new_call_id(), value["name"], text)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallReader:
    """Feed an answer's text in order; each call returns (content, calls) it settles."""

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

    def finish(self) -> str:
        """The text held at the end: an unclosed block stays content, as written."""
        held, self._held = self._held, ""
        return START + held if self._inside else held
