"""The protocols' ways to ask for structured output, read into one `StructuredOutput`.

- OpenAI's ``response_format``: ``{"type": "text"}``, ``{"type": "json_object"}`` and
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``;
- TGI's grammar (``parameters.grammar`` and its chat's ``response_format``):
  ``{"type": "json" | "json_object" | "regex" | "json_schema", "value": ...}``;
- vLLM's ``structured_outputs`` object (``json``, ``json_object``, ``regex``, ``choice``,
  ``grammar``) and its older ``guided_json``, ``guided_regex``, ``guided_choice`` and
  ``guided_grammar`` fields.

Only the shapes are checked here; whether a schema or grammar compiles is checked when the
request's SamplingParams are made (`StructuredOutput.problem`).
"""

from __future__ import annotations

import json
from typing import Any

from inferd.server.errors import InvalidRequestError
from inferd.structured.spec import StructuredOutput
from inferd.writable import first_unwritable


def _schema_text(schema: Any, field: str) -> str:
    """A JSON schema given as an object, or as the text of one (vLLM's fields take both)."""
    if isinstance(schema, str):
        try:
            parsed = json.loads(schema)
        except ValueError:  # an integer past 4,300 digits is a plain ValueError
            raise InvalidRequestError(f"{field}: not valid JSON", field) from None
        except RecursionError:
            raise InvalidRequestError(f"{field}: not valid JSON: nested too deeply", field) from None
        schema, text = parsed, schema
    else:
        text = json.dumps(schema)
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{field}: a JSON schema must be an object", field)
    _check_schema_values(schema, field)
    return text


def _check_schema_values(schema: Any, field: str) -> None:
    """Python's JSON reader takes NaN and Infinity, which a schema's text then carries to the
    grammar compiler; it read NaN as null, so a request got a constraint it never sent."""
    where = first_unwritable(schema, field)
    if where is not None:
        raise InvalidRequestError(
            f"{where}: a JSON schema cannot hold NaN, Infinity or a lone surrogate (\\ud800)", field
        )


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{field}: must be a non-empty string", field)
    return value


def _choices(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise InvalidRequestError(f"{field}: must be a non-empty list of non-empty strings", field)
    return value


def response_format(value: dict[str, Any], field: str = "response_format") -> StructuredOutput | None:
    """OpenAI's ``response_format`` or TGI's grammar object (None for plain text)."""
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object" and value.get("value") is None:
        return StructuredOutput(json_object=True)
    if kind in ("json", "json_object"):  # TGI's: the schema in "value"
        return StructuredOutput(json=_schema_text(value.get("value"), f"{field}.value"))
    if kind == "regex":
        return StructuredOutput(regex=_text(value.get("value"), f"{field}.value"))
    if kind == "json_schema":
        # OpenAI puts {"name", "schema", "strict"} under "json_schema", TGI under "value"; one given
        # neither is named in OpenAI's terms.
        key = "value" if "value" in value and "json_schema" not in value else "json_schema"
        config = value.get(key)
        if not isinstance(config, dict) or config.get("schema") is None:
            raise InvalidRequestError(
                f"{field}.{key}: needs a schema: {{'name': ..., 'schema': {{...}}}}", field
            )
        return StructuredOutput(json=_schema_text(config["schema"], f"{field}.{key}.schema"))
    raise InvalidRequestError(
        f"{field}.type: must be one of text, json_object, json_schema, json, regex; got {kind!r}", field
    )


_STRUCTURED_OUTPUTS_KEYS = ("json", "json_object", "regex", "choice", "grammar")
# vLLM's options beside the constraint that inferd's behaviour already matches, taken and ignored:
# JSON is compact and objects closed by default, and there is one grammar backend to fall back on.
_IGNORED_OPTION_KEYS = ("disable_any_whitespace", "disable_additional_properties", "disable_fallback")


def _structured_outputs(value: dict[str, Any], field: str = "structured_outputs") -> StructuredOutput:
    """vLLM's ``structured_outputs`` object: exactly one of its constraint keys."""
    unknown = sorted(set(value) - set(_STRUCTURED_OUTPUTS_KEYS) - set(_IGNORED_OPTION_KEYS))
    if unknown:
        raise InvalidRequestError(
            f"{field}: unsupported keys {unknown}; one of {list(_STRUCTURED_OUTPUTS_KEYS)} is taken", field
        )
    given = [key for key in _STRUCTURED_OUTPUTS_KEYS if value.get(key) not in (None, False)]
    if len(given) != 1:
        raise InvalidRequestError(f"{field}: give exactly one of {list(_STRUCTURED_OUTPUTS_KEYS)}", field)
    key = given[0]
    return _one(key, value[key], f"{field}.{key}")


def _one(key: str, value: Any, field: str) -> StructuredOutput:
    if key == "json":
        return StructuredOutput(json=_schema_text(value, field))
    if key == "json_object":
        if value is not True:
            raise InvalidRequestError(f"{field}: must be true", field)
        return StructuredOutput(json_object=True)
    if key == "regex":
        return StructuredOutput(regex=_text(value, field))
    if key == "choice":
        return StructuredOutput(choice=_choices(value, field))
    return StructuredOutput(grammar=_text(value, field))


# vLLM's older per-kind fields, by the structured_outputs key each stands for.
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}  # fmt: skip


def requested(fields: dict[str, Any]) -> tuple[StructuredOutput | None, str]:
    """The one constraint among a body's fields (name -> value, None where unset), and the name
    of the field that gave it, for errors to name. Two at once are refused."""
    found: list[tuple[StructuredOutput, str]] = []
    for name, value in fields.items():
        if value is None:
            continue
        if name in GUIDED_FIELDS:
            spec: StructuredOutput | None = _one(GUIDED_FIELDS[name], value, name)
        elif name == "structured_outputs":
            spec = _structured_outputs(value, name)
        else:
            spec = response_format(value, name)
        if spec is not None:
            found.append((spec, name))
    if len(found) > 1:
        names = " and ".join(name for _, name in found)
        raise InvalidRequestError(f"{names}: ask for one structured output at most", found[1][1])
    return found[0] if found else (None, "")
