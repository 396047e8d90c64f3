"""What a request's output must match: a JSON schema, any JSON object, a regex, one of a few
strings, or a grammar (Lark or GBNF); turned into the grammar text the matcher compiles.

The fields and their meanings are vLLM's ``structured_outputs`` ones, so each protocol's own
field (OpenAI's ``response_format``, TGI's ``grammar``) maps onto one of them. The grammar engine
is llguidance: it compiles each of these forms and computes, per step, which tokens may come next.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from inferd.structured.deep_stack import on_deep_stack
from inferd.writable import first_unwritable

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# Compact JSON unless a schema asks otherwise (its "x-guidance" object): small models given
# free whitespace tend to loop on newlines until their token budget runs out. Lenient: keywords
# the compiler does not implement (Pydantic's formats such as "password" or "binary", which JSON
# Schema calls annotations) are left out rather than refusing the schema.
_JSON_DEFAULTS: JsonCompileOptions = {"whitespace_flexible": False, "lenient": True}
# Constraints longer than this are compiled each time rather than cached: the caches are bounded
# by entries, and a few huge schemas (the body limit allows megabytes) would hold much memory.
_CACHED_MAX_CHARS = 64 * 1024
# The longest constraint taken (its schema, regex, grammar or choices together). Compiling
# recurses over its rules (see deep_stack.py) and its time grows faster than its size (100,000
# choices took 16 s): far past any real schema, and still bounded.
MAX_CONSTRAINT_CHARS = 256 * 1024


class StructuredOutputError(ValueError):
    """The constraint cannot be compiled or used; the message says why."""


@dataclass(frozen=True)
class StructuredOutput:
    """Exactly one of the fields is set.

    ``json``: a JSON schema's text; ``json_object``: any JSON object; ``regex``: a regular
    expression the whole output matches (Rust regex syntax); ``choice``: the output is one of
    these strings; ``grammar``: a Lark grammar (llguidance's dialect), or a GBNF one (``::=``).

    ``starts_after``: token ids after which the constraint starts (a reasoning model's
    end-of-thinking tag, so that it thinks freely first); the output is free until they appear.
    """

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    starts_after: list[int] | None = None

    @property
    def kinds(self) -> list[str]:
        """The fields set (one in a usable constraint)."""
        kinds = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        return kinds + (["json_object"] if self.json_object else [])

    def problem(self) -> str | None:
        """Why this constraint cannot be used (None when it compiles). Checked when the request's
        SamplingParams are made, so a bad constraint is its error before it is queued."""
        kinds = self.kinds
        if len(kinds) != 1:
            return f"exactly one constraint must be given, got {kinds or 'none'}"
        if self.choice is not None and (not self.choice or any(not c for c in self.choice)):
            return "choice must be a non-empty list of non-empty strings"
        if self.starts_after is not None and (not self.starts_after or min(self.starts_after) < 0):
            return "starts_after must be a non-empty list of token ids"
        try:
            grammar = self.grammar_text()
        except StructuredOutputError as exc:
            return str(exc)
        validate = _validate if len(grammar) <= _CACHED_MAX_CHARS else _validate.__wrapped__
        return validate(grammar).strip() or None

    def grammar_text(self) -> str:
        """The constraint as the grammar llguidance's matcher takes."""
        choice = tuple(self.choice) if self.choice is not None else None
        size = sum(
            len(part) for part in (self.json or "", self.regex or "", self.grammar or "", *(choice or ()))
        )
        if size > MAX_CONSTRAINT_CHARS:
            raise StructuredOutputError(
                f"the constraint is {size:,} characters long; at most {MAX_CONSTRAINT_CHARS:,} are taken"
            )
        compile_ = _grammar_text if size <= _CACHED_MAX_CHARS else _grammar_text.__wrapped__
        return compile_(self.json, self.json_object, self.regex, choice, self.grammar)


# Bounded: a server sees the same few schemas again and again, but clients could send endless new ones.
@lru_cache(maxsize=256)
def _grammar_text(
    schema: str | None,
    json_object: bool,
    regex: str | None,
    choice: tuple[str, ...] | None,
    grammar: str | None,
) -> str:
    def compile_() -> str:
        try:
            return _compiled_grammar_text(schema, json_object, regex, choice, grammar)
        except StructuredOutputError:
            raise
        except Exception as exc:  # llguidance's own refusals (limits, values it cannot represent)
            raise StructuredOutputError(f"the constraint cannot be compiled: {exc}") from None

    return on_deep_stack(compile_)


def _compiled_grammar_text(
    schema: str | None,
    json_object: bool,
    regex: str | None,
    choice: tuple[str, ...] | None,
    grammar: str | None,
) -> str:
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    if json_object:
        return str(LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_JSON_DEFAULTS))
    if schema is not None:
        try:
            parsed = json.loads(schema)
        except (ValueError, RecursionError) as exc:  # an integer past 4,300 digits is a plain ValueError
            raise StructuredOutputError(f"not a JSON schema: {exc}") from None
        if not isinstance(parsed, dict):
            raise StructuredOutputError("a JSON schema must be an object")
        # Python's reader takes NaN and Infinity; the compiler read NaN as null, a schema never sent.
        where = first_unwritable(parsed, "schema")
        if where is not None:
            raise StructuredOutputError(
                f"{where}: a JSON schema cannot hold NaN, Infinity or a lone surrogate"
            )
        try:
            closed = _closed_objects(parsed)
        except RecursionError:
            raise StructuredOutputError("the JSON schema is nested too deeply") from None
        return str(LLMatcher.grammar_from_json_schema(closed, defaults=_JSON_DEFAULTS))
    if regex is not None:
        return str(LLMatcher.grammar_from_regex(regex))
    if choice is not None:
        # Lark string literals take JSON's escapes, so json.dumps quotes any text safely.
        return str(LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choice)))
    assert grammar is not None
    try:
        lark = any_to_lark(grammar)
    except Exception as exc:  # the converter raises bare, index and recursion errors as well as its own
        raise StructuredOutputError(f"not a Lark or GBNF grammar: {exc or type(exc).__name__}") from None
    return str(LLMatcher.grammar_from_lark(lark))


@lru_cache(maxsize=256)
def _validate(grammar: str) -> str:
    from llguidance import LLMatcher

    return on_deep_stack(lambda: str(LLMatcher.validate_grammar(grammar)))


# Where a schema keeps its subschemas: one, a list of them, or a name -> schema map ("items" is
# one schema, or a list of them in drafts before 2020-12).
_ONE = ("additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
        "additionalItems", "unevaluatedItems", "unevaluatedProperties")  # fmt: skip
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")
# Subschemas never closed: closing them would change what they exclude, or when they apply.
_NOT_CLOSED = frozenset({"not", "if", "then", "else", "dependentSchemas", "dependencies"})


# Beside these, an object's properties are not all its own: others may add to them.
_COMPOSED = frozenset({"allOf", "anyOf", "oneOf", "$ref", "if", "then", "else", "dependentSchemas",
                       "additionalProperties", "patternProperties", "unevaluatedProperties"})  # fmt: skip
# Keywords beside a reference that add to what its target must take (annotations such as
# "description" or "default", which Pydantic writes beside one, do not).
_ADDS_TO_A_REFERENCE = (_COMPOSED - {"$ref"}) | {
    "properties",
    "required",
    "dependencies",
    "dependentRequired",
}


def _rebuilt(schema: dict[str, Any], pointer: str, child: Callable[[str, str, Any], Any]) -> dict[str, Any]:
    """A copy of ``schema`` whose subschemas are ``child(keyword, their JSON pointer, subschema)``."""
    rebuilt = dict(schema)
    items = rebuilt.get("items")
    for key in (*_ONE, *(() if isinstance(items, list) else ("items",))):
        if key in rebuilt:
            rebuilt[key] = child(key, f"{pointer}/{key}", rebuilt[key])
    for key in (*_LIST, *(("items",) if isinstance(items, list) else ())):
        if isinstance(rebuilt.get(key), list):
            rebuilt[key] = [child(key, f"{pointer}/{key}/{i}", sub) for i, sub in enumerate(rebuilt[key])]
    for key in _MAP:
        if isinstance(rebuilt.get(key), dict):
            rebuilt[key] = {name: child(key, f"{pointer}/{key}/{_escaped(name)}", sub)
                            for name, sub in rebuilt[key].items()}  # fmt: skip
    return rebuilt


def _children(schema: dict[str, Any]) -> list[tuple[str, Any]]:
    """A schema's direct subschemas, with the keyword each is under."""
    found: list[tuple[str, Any]] = []

    def note(key: str, _at: str, sub: Any) -> Any:
        found.append((key, sub))
        return sub

    _rebuilt(schema, "", note)
    return found


def _escaped(name: str) -> str:
    """A name as one step of a JSON pointer."""
    return str(name).replace("~", "~0").replace("/", "~1")


def _extended_refs(schema: Any) -> Iterator[str]:
    """References whose targets other schemas add properties to: one beside keywords that add to
    it, a branch's of an ``allOf`` that merges (several branches, or a parent with properties of
    its own), and an ``anyOf``/``oneOf`` branch's under such a parent."""
    if not isinstance(schema, dict):
        return
    if isinstance(schema.get("$ref"), str) and _ADDS_TO_A_REFERENCE & set(schema):
        yield schema["$ref"]
    adds = "properties" in schema or "required" in schema
    for key, sub in _children(schema):
        merged = (key == "allOf" and (adds or len(schema["allOf"]) > 1)) or (
            key in ("anyOf", "oneOf") and adds
        )
        if merged and isinstance(sub, dict) and isinstance(sub.get("$ref"), str):
            yield sub["$ref"]
        yield from _extended_refs(sub)


def _closed_objects(schema: Any) -> Any:
    """The schema with every object that lists its ``properties`` taking no others unless it says
    so: what vLLM's default grammar backend and OpenAI's strict mode do. Without it a model may go
    on after the last listed property with keys of its own making, as plain JSON Schema allows.

    An object is left open where others may add properties to it: beside a composition keyword
    or a reference, as a branch of ``allOf`` (its branches are merged), as a branch of
    ``anyOf``/``oneOf`` under an object with properties of its own, and as the target of a
    reference used in one of those ways."""
    return _close(schema, "#", frozenset(_extended_refs(schema)), may_close=True)


def _close(schema: Any, pointer: str, extended: frozenset[str], may_close: bool) -> Any:
    if not isinstance(schema, dict):
        return schema
    adds = "properties" in schema or "required" in schema  # the parent adds to its branches

    def child(key: str, at: str, sub: Any) -> Any:
        if key in _NOT_CLOSED:
            closeable = False
        elif key == "allOf":  # its branches are merged, unless there is one and nothing beside
            closeable = not adds and len(schema["allOf"]) == 1
        else:
            closeable = key not in _LIST or not adds
        return _close(sub, at, extended, closeable)

    closed = _rebuilt(schema, pointer, child)
    closeable = may_close and pointer not in extended and not _COMPOSED & set(closed)
    listed = closed.get("properties")
    required = closed.get("required")
    # A required name the properties do not list can only be another property: left open.
    unlisted = (
        isinstance(required, list) and isinstance(listed, dict) and not set(map(str, required)) <= set(listed)
    )
    if closeable and isinstance(listed, dict) and not unlisted:
        closed["additionalProperties"] = False
    return closed


def rebased_refs(schema: Any, base: str) -> Any:
    """The schema moved to the JSON pointer ``base`` of a larger one: its JSON-pointer references
    (``#`` and ``#/...``) rewritten to point from there (anchors, ``#name``, stay as they are)."""
    if not isinstance(schema, dict):
        return schema
    moved = _rebuilt(schema, "", lambda _key, _at, sub: rebased_refs(sub, base))
    ref = moved.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        moved["$ref"] = base + ref[1:]
    return moved
