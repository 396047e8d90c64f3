"""Sampling parameters of the v2 generate extension, from request parameters to GenerationParams."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from inferd.serving.errors import InvalidInputError
from inferd.serving.runtimes.base import GenerationParams
from inferd.structured.spec import StructuredOutput


def _number(parameters: Mapping[str, Any], key: str, integer: bool) -> Any:
    value = parameters.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (integer and not isinstance(value, int))
    ):
        raise InvalidInputError(f"parameter {key!r} must be {'an integer' if integer else 'a number'}")
    return value


def _stop(parameters: Mapping[str, Any]) -> tuple[str, ...]:
    stop = parameters.get("stop", ())
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise InvalidInputError("parameter 'stop' must be a string or a list of strings")


def generation_params(parameters: Mapping[str, Any]) -> GenerationParams:
    """Known sampling fields are type-checked; other fields are ignored, as v2 servers do."""
    max_tokens = _number(parameters, "max_tokens", integer=True)
    if max_tokens is not None and max_tokens < 1:
        raise InvalidInputError("parameter 'max_tokens' must be at least 1")
    temperature = _number(parameters, "temperature", integer=False)
    if temperature is not None and temperature < 0:
        raise InvalidInputError("parameter 'temperature' must be >= 0")
    top_p = _number(parameters, "top_p", integer=False)
    if top_p is not None and not 0 < top_p <= 1:
        raise InvalidInputError("parameter 'top_p' must be in (0, 1]")
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=_number(parameters, "top_k", integer=True),
        seed=_number(parameters, "seed", integer=True),
        stop=_stop(parameters),
        timeout_s=_timeout_s(parameters),
        **_structured_output(parameters),
    )


def _structured_output(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM's guided_* fields, one at most. gRPC parameters are scalars, so a schema or a list of
    choices may come as JSON text; REST may send them as JSON values too."""
    fields = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
    given = [key for key in fields if parameters.get(key) is not None]  # null is unset, as in vLLM
    if not given:
        return {}
    if len(given) > 1:
        raise InvalidInputError(f"parameters {given}: give one structured output at most")
    key = given[0]
    value = parameters[key]
    if key in ("guided_json", "guided_choice") and isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise InvalidInputError(f"parameter {key!r} is not valid JSON") from None
    if key == "guided_json":
        if not isinstance(value, dict):
            raise InvalidInputError("parameter 'guided_json' must be a JSON schema object")
        spec = StructuredOutput(json=json.dumps(value))
    elif key == "guided_choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise InvalidInputError("parameter 'guided_choice' must be a non-empty list of non-empty strings")
        spec = StructuredOutput(choice=value)
    elif not isinstance(value, str) or not value:
        raise InvalidInputError(f"parameter {key!r} must be a non-empty string")
    else:
        spec = StructuredOutput(regex=value) if key == "guided_regex" else StructuredOutput(grammar=value)
    return {"structured_output": spec, "structured_output_field": key}


def _timeout_s(parameters: Mapping[str, Any]) -> float | None:
    """Triton's `timeout` request parameter, in microseconds (what tritonclient's `timeout=` sends);
    0, as in Triton, means none."""
    microseconds = _number(parameters, "timeout", integer=True)
    if not microseconds:
        return None
    if microseconds < 0:
        raise InvalidInputError("parameter 'timeout' must be a non-negative number of microseconds")
    return float(microseconds) / 1e6
