"""`tool_choice: "required"` and a named function (`{"type": "function", "function": {"name": ...}}`):
the answer is forced to be calls by decoding constrained to the tools' schemas, as vLLM does.

A named function's answer is its arguments object, made to the function's `parameters` schema;
a required call's answer is a JSON array of `{"name": ..., "parameters": {...}}` objects, each one
of the offered tools with its own schema (one item at most with `parallel_tool_calls: false`); the
tools' schemas sit under the array schema's `$defs`, their own references rebased to match. The
model's own call format (`--tool-call-parser`) plays no part, so no parser is needed for these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from inferd.server.errors import InvalidRequestError
from inferd.server.tool_calls import ParsedToolCall, new_call_id
from inferd.structured.spec import rebased_refs
from inferd.writable import first_unwritable, is_writable_text

# A function declared without parameters takes none: an empty object (as vLLM reads it).
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ForcedCalls:
    """How a forced answer's text becomes calls."""

    function: str | None  # the named function; None for "required" (an array of calls)

    def read(self, text: str) -> list[ParsedToolCall] | None:
        """The calls in a whole answer; None where it is not calls' JSON (cut off by its budget)."""
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # an integer past 4,300 digits is a plain ValueError
            return None
        if self.function is not None:
            # The arguments as the model wrote them (valid JSON): a round trip could change them.
            return (
                [ParsedToolCall(new_call_id(), self.function, text.strip())]
                if isinstance(value, dict)
                else None
            )
        calls = value if isinstance(value, list) else []
        if not calls or not all(_is_call(item) for item in calls):
            return None
        parsed = []
        for item in calls:
            try:  # strict JSON, as the other parsers' calls: no NaN or infinity a client cannot read
                arguments = json.dumps(item["parameters"], ensure_ascii=False, allow_nan=False)
            except ValueError:
                return None
            if not (is_writable_text(item["name"]) and is_writable_text(arguments)):
                return None  # a lone surrogate's escape (\ud800): no answer could carry it
            parsed.append(ParsedToolCall(new_call_id(), item["name"], arguments))
        return parsed


def _is_call(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("name"), str)
        and isinstance(item.get("parameters"), dict)
    )


def forced_calls(
    tools: list[dict[str, Any]], choice: str | dict[str, Any], one_call: bool
) -> tuple[ForcedCalls, dict[str, Any]]:
    """The reading and the JSON schema of the answer that ``choice`` forces (``tools`` already
    checked to be functions with names)."""
    for index, tool in enumerate(tools):
        # Python's JSON reader takes NaN and Infinity, which the schema's text carried on to the
        # grammar compiler: it read NaN as null, a constraint the client never sent.
        where = first_unwritable(tool["function"].get("parameters"), f"tools[{index}].function.parameters")
        if where is not None:
            raise InvalidRequestError(
                f"{where}: a JSON schema cannot hold NaN, Infinity or a lone surrogate (\\ud800)", "tools"
            )
    functions = {tool["function"]["name"]: tool["function"] for tool in tools}
    if choice == "required":
        # Each tool's schema under $defs, its references rebased there ("#/$defs/X" of a Pydantic
        # schema becomes "#/$defs/tool_0/$defs/X"), so they point where they did.
        try:
            definitions = {f"tool_{i}": rebased_refs(_embedded(_parameters(function)), f"#/$defs/tool_{i}")
                           for i, function in enumerate(functions.values())}  # fmt: skip
        except RecursionError:
            raise InvalidRequestError(
                "tools: a tool's parameters schema is nested too deeply", "tools"
            ) from None
        items = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": {"$ref": f"#/$defs/tool_{i}"}},
                "required": ["name", "parameters"],
            }
            for i, name in enumerate(functions)
        ]
        schema: dict[str, Any] = {
            "type": "array", "minItems": 1, "items": {"anyOf": items}, "$defs": definitions
        }  # fmt: skip
        if one_call:
            schema["maxItems"] = 1
        return ForcedCalls(None), schema
    named = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = named.get("name") if isinstance(named, dict) else None
    if not isinstance(name, str):
        shape = "'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}"
        raise InvalidRequestError(f"tool_choice: must be {shape}", "tool_choice")
    if name not in functions:
        raise InvalidRequestError(f"tool_choice: no tool named {name!r} is offered in tools", "tool_choice")
    return ForcedCalls(name), _parameters(functions[name])


def _embedded(schema: dict[str, Any]) -> dict[str, Any]:
    """A tool's schema as one part of a larger one: without the identifiers of a document of its
    own (a nested "$id" would be the base its references resolve against)."""
    return {key: value for key, value in schema.items() if key not in ("$id", "$schema")}


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    parameters = function.get("parameters")
    if parameters is None:
        return _NO_PARAMETERS
    if not isinstance(parameters, dict):
        raise InvalidRequestError(
            f"tools: {function['name']}'s parameters must be a JSON schema object", "tools"
        )
    return parameters
