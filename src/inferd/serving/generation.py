"""Sampling parameters of the v2 generate extension, from request parameters to GenerationParams."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from inferd.serving.errors import InvalidInputError
from inferd.serving.runtimes.base import GenerationParams
from inferd.structured.spec import StructuredOutput


def _number(parameters: Mapping[str, Any], key: str, integer: bool) -> Any:
    """A number, or its text: Triton's vLLM clients send every sampling parameter as a string
    (`{"max_tokens": "100"}`), as its backend reads them."""
    value = parameters.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            raise InvalidInputError(
                f"parameter {key!r} must be {'an integer' if integer else 'a number'}, got {value!r}"
            ) from None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (integer and not isinstance(value, int))
    ):
        raise InvalidInputError(f"parameter {key!r} must be {'an integer' if integer else 'a number'}")
    return value


def flag(parameters: Mapping[str, Any], key: str) -> bool | None:
    """A true/false parameter, or its text ("true", "false", "1", "0"); None when absent."""
    value = parameters.get(key)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _FLAG_TEXTS:
        return _FLAG_TEXTS[value.strip().lower()]
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InvalidInputError(f"parameter {key!r} must be true or false, got {value!r}")


_FLAG_TEXTS = {"true": True, "false": False, "1": True, "0": False}

# vLLM sampling fields read into SamplingParams as they are: name -> integer (or a float).
_NUMBERS = {
    "repetition_penalty": False,
    "presence_penalty": False,
    "frequency_penalty": False,
    "min_p": False,
    "min_tokens": True,
}
_FLAGS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")
# vLLM fields that would ask for more than one sequence a request: refused unless they ask for one.
_ONE_SEQUENCE = ("n", "best_of")


def _sampling(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The other vLLM sampling fields, under SamplingParams' names (which check their ranges)."""
    sampling: dict[str, Any] = {}
    for key, integer in _NUMBERS.items():
        if (value := _number(parameters, key, integer)) is not None:
            sampling[key] = value
    for key in _FLAGS:
        if (value := flag(parameters, key)) is not None:
            sampling[key] = value
    for key in _ONE_SEQUENCE:
        count = _number(parameters, key, integer=True)
        if count is not None and count != 1:
            raise InvalidInputError(f"parameter {key!r}: a v2 request generates one sequence, got {count}")
    if flag(parameters, "use_beam_search"):
        raise InvalidInputError("parameter 'use_beam_search': beam search is served on the OpenAI routes")
    stop_token_ids = _json_value(parameters, "stop_token_ids")
    if stop_token_ids is not None:
        if not isinstance(stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in stop_token_ids
        ):
            raise InvalidInputError("parameter 'stop_token_ids' must be a list of token ids")
        sampling["stop_token_ids"] = stop_token_ids
    adapter = parameters.get("lora_name")
    if adapter is not None:
        if not isinstance(adapter, str) or not adapter:
            raise InvalidInputError("parameter 'lora_name' must be a LoRA adapter's name")
        sampling["adapter"] = adapter
    return sampling


def _json_value(parameters: Mapping[str, Any], key: str) -> Any:
    """A list or object parameter, or its JSON text (gRPC parameters are scalars)."""
    value = parameters.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise InvalidInputError(f"parameter {key!r} is not valid JSON") from None
    return value


def _stop(parameters: Mapping[str, Any]) -> tuple[str, ...]:
    stop = parameters.get("stop", ())
    if isinstance(stop, str):
        # Triton's vLLM clients send a list as its JSON text; any other text ("[INST]" too) is one
        # stop string.
        try:
            listed = json.loads(stop) if stop.startswith("[") else None
        except (json.JSONDecodeError, RecursionError):
            listed = None
        if not (isinstance(listed, list) and listed and all(isinstance(s, str) for s in listed)):
            return (stop,)
        stop = listed
    if isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise InvalidInputError("parameter 'stop' must be a string or a list of strings")


def generation_params(parameters: Mapping[str, Any], cumulative_logprob: bool = False) -> GenerationParams:
    """Known sampling fields are type-checked; other fields are ignored, as v2 servers do (Triton's
    own request parameters, such as `priority`, travel among them). `cumulative_logprob`: the
    generated tokens' log-probabilities are summed (Triton's `return_cumulative_logprob`)."""
    max_tokens = _number(parameters, "max_tokens", integer=True)
    if max_tokens is not None and max_tokens < 1:
        raise InvalidInputError("parameter 'max_tokens' must be at least 1")
    temperature = _number(parameters, "temperature", integer=False)
    if temperature is not None and temperature < 0:
        raise InvalidInputError("parameter 'temperature' must be >= 0")
    top_p = _number(parameters, "top_p", integer=False)
    if top_p is not None and not 0 < top_p <= 1:
        raise InvalidInputError("parameter 'top_p' must be in (0, 1]")
    sampling = _sampling(parameters)
    if cumulative_logprob:
        sampling["logprobs"] = 0  # the sampled tokens' own log-probabilities
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=_number(parameters, "top_k", integer=True),
        seed=_number(parameters, "seed", integer=True),
        stop=_stop(parameters),
        timeout_s=_timeout_s(parameters),
        sampling=sampling,
        cumulative_logprob=cumulative_logprob,
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
