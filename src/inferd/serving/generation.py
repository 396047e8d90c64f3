"""Sampling parameters of the v2 generate extension, from request parameters to GenerationParams."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inferd.serving.errors import InvalidInputError
from inferd.serving.runtimes.base import GenerationParams


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
    )


def _timeout_s(parameters: Mapping[str, Any]) -> float | None:
    """Triton's `timeout` request parameter, in microseconds (what tritonclient's `timeout=` sends);
    0, as in Triton, means none."""
    microseconds = _number(parameters, "timeout", integer=True)
    if not microseconds:
        return None
    if microseconds < 0:
        raise InvalidInputError("parameter 'timeout' must be a non-negative number of microseconds")
    return float(microseconds) / 1e6
