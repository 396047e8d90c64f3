"""Sampling parameters of the v2 generate extension, from request parameters to GenerationParams.

As Triton's vLLM backend, which builds vLLM's SamplingParams from them, a field this server does not
know is refused (400 / INVALID_ARGUMENT, naming it) rather than dropped; Triton's own request
parameters (`priority`, `timeout`, the sequence fields, `binary_data_output`, `triton_*`) travel
among them and are not sampling fields.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

from inferd.serving.errors import InvalidInputError
from inferd.serving.runtimes.base import GenerationParams
from inferd.structured.spec import StructuredOutput
from inferd.writable import first_unwritable


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
# vLLM's fields of token ids: a list of them.
_TOKEN_ID_LISTS = ("stop_token_ids", "allowed_token_ids")
# vLLM fields whose answer a v2 response cannot carry: refused (null is unset, as in vLLM).
_REFUSED = {
    "logprobs": "per-token log-probabilities are served on the OpenAI routes",
    "prompt_logprobs": "prompt log-probabilities are served on the OpenAI routes",
}
# vLLM's structured-output fields: the older per-kind ones, and the objects (`guided_decoding`, as
# Triton's vLLM backend still takes it, and `structured_outputs`) holding one of those kinds.
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}  # fmt: skip
_STRUCTURED_OBJECTS = ("guided_decoding", "structured_outputs")
_STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")
# Options of those objects that this server's behaviour already matches (compact JSON, closed
# objects, one grammar engine to fall back on): taken and ignored.
_STRUCTURED_OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "disable_fallback")
# The sampling fields read here, by vLLM's names (`lora_name` is Triton's vLLM backend's).
SAMPLING_FIELDS = frozenset(
    {
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stop_words",
        "bad_words",
        "logit_bias",
        "lora_name",
        "use_beam_search",
        *_NUMBERS,
        *_FLAGS,
        *_ONE_SEQUENCE,
        *_TOKEN_ID_LISTS,
        *_REFUSED,
        *_GUIDED_FIELDS,
        *_STRUCTURED_OBJECTS,
    }
)
# Triton's own request parameters (tritonclient reserves these names and the `triton_` prefix).
# Open Inference Protocol's request-level `content_type` (MLServer's request codecs set it) too.
TRITON_PARAMETERS = frozenset(
    {"priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "headers", "binary_data_output",
     "content_type"}
)  # fmt: skip
_TRITON_PREFIX = "triton_"


def _sampling(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The other vLLM sampling fields, under SamplingParams' names (which check their ranges)."""
    _refuse_what_a_v2_response_cannot_answer(parameters)
    sampling: dict[str, Any] = {}
    for key, integer in _NUMBERS.items():
        if (value := _number(parameters, key, integer)) is not None:
            sampling[key] = value
    for key in _FLAGS:
        if (value := flag(parameters, key)) is not None:
            sampling[key] = value
    sampling.update(_token_fields(parameters))
    if priority := _priority(parameters):  # Triton's 0 is the engine's default
        sampling["priority"] = priority
    adapter = parameters.get("lora_name")
    if adapter is not None:
        if not isinstance(adapter, str) or not adapter:
            raise InvalidInputError("parameter 'lora_name' must be a LoRA adapter's name")
        sampling["adapter"] = adapter
    return sampling


def _refuse_what_a_v2_response_cannot_answer(parameters: Mapping[str, Any]) -> None:
    """More than one sequence, or log-probabilities: a v2 response has no place for them."""
    for key in _ONE_SEQUENCE:
        count = _number(parameters, key, integer=True)
        if count is not None and count != 1:
            raise InvalidInputError(f"parameter {key!r}: a v2 request generates one sequence, got {count}")
    if flag(parameters, "use_beam_search"):
        raise InvalidInputError("parameter 'use_beam_search': beam search is served on the OpenAI routes")
    for key, reason in _REFUSED.items():
        if parameters.get(key) is not None:
            raise InvalidInputError(f"parameter {key!r} is not supported over v2: {reason}")


def _token_fields(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM's fields about particular tokens (lists of ids, words, biases), as lists or objects or
    their JSON text; SamplingParams and the Frontend check the ids and values."""
    fields: dict[str, Any] = {}
    for key in _TOKEN_ID_LISTS:
        token_ids = _json_value(parameters, key)
        if token_ids is not None:
            if not isinstance(token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in token_ids
            ):
                raise InvalidInputError(f"parameter {key!r} must be a list of token ids")
            fields[key] = token_ids
    bad_words = _words(parameters, "bad_words")
    if bad_words:
        fields["bad_words"] = list(bad_words)
    logit_bias = _json_value(parameters, "logit_bias")
    if logit_bias is not None:
        fields["logit_bias"] = _logit_bias(logit_bias)
    return fields


def _logit_bias(value: Any) -> dict[int, float]:
    """An object of token id (JSON's keys are text) -> bias, keyed by int for the Frontend's id check."""
    if not isinstance(value, dict):
        raise InvalidInputError("parameter 'logit_bias' must be an object of token id -> bias")
    biases: dict[int, float] = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise InvalidInputError(f"parameter 'logit_bias': keys must be token ids, got {key!r}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise InvalidInputError(f"parameter 'logit_bias': the bias of token {key} must be a number")
        biases[int(key)] = float(bias)
    return biases


def _json_value(parameters: Mapping[str, Any], key: str) -> Any:
    """A list or object parameter, or its JSON text (gRPC parameters are scalars)."""
    value = parameters.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):  # an integer past 4,300 digits is a plain ValueError
            raise InvalidInputError(f"parameter {key!r} is not valid JSON") from None
    return value


def _stop(parameters: Mapping[str, Any]) -> tuple[str, ...]:
    """vLLM's `stop`, or the TensorRT-LLM backend's `stop_words` (Triton's generate examples send
    it, often empty); one of them at most."""
    if parameters.get("stop") is not None and parameters.get("stop_words") is not None:
        raise InvalidInputError("parameters 'stop' and 'stop_words' say the same: give one")
    # An empty `stop` stays one (empty) stop string, refused as such; Triton's generate examples
    # send `"stop_words": ""` meaning none.
    return _words(parameters, "stop", empty_is_none=False) or _words(parameters, "stop_words")


def _words(parameters: Mapping[str, Any], key: str, empty_is_none: bool = True) -> tuple[str, ...]:
    """A list of strings, its JSON text (Triton's vLLM clients send lists so), or one string: any
    other text ("[INST]" too) is one word, and the empty text none (with ``empty_is_none``)."""
    words = parameters.get(key)
    if words is None or (words == "" and empty_is_none):
        return ()
    if isinstance(words, str):
        try:
            listed = json.loads(words) if words.startswith("[") else None
        except (ValueError, RecursionError):  # an integer past 4,300 digits is a plain ValueError
            listed = None
        if not (isinstance(listed, list) and listed and all(isinstance(s, str) for s in listed)):
            return (words,)
        words = listed
    if isinstance(words, (list, tuple)) and all(isinstance(s, str) for s in words):
        return tuple(words)
    raise InvalidInputError(f"parameter {key!r} must be a string or a list of strings")


def _priority(parameters: Mapping[str, Any]) -> int | None:
    """Triton's request `priority` (its schedule-policy extension): 0 or absent is the default,
    a lower value runs sooner; as the engine's priority of the same number (the OpenAI routes'),
    whose default is 0. The engine refuses one under first-come-first-served scheduling."""
    priority = _number(parameters, "priority", integer=True)
    if priority is not None and priority < 0:
        raise InvalidInputError(
            f"parameter 'priority' must be a non-negative integer (Triton's), got {priority}"
        )
    return priority


def _refuse_unknown(parameters: Mapping[str, Any], also_known: Collection[str]) -> None:
    """A field that is neither a sampling field, nor Triton's own, nor one the caller reads
    (``also_known``: the request's flags) is refused, naming it: a typo (`max_token`) or a vLLM
    field this server does not implement would otherwise be silently not applied."""
    unknown = sorted(
        key
        for key in parameters
        if key not in SAMPLING_FIELDS
        and key not in TRITON_PARAMETERS
        and key not in also_known
        and not key.startswith(_TRITON_PREFIX)
    )
    if unknown:
        raise InvalidInputError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))}; the sampling fields taken are "
            f"{', '.join(sorted(SAMPLING_FIELDS))}"
        )


def generation_params(
    parameters: Mapping[str, Any], cumulative_logprob: bool = False, also_known: Collection[str] = ()
) -> GenerationParams:
    """Known sampling fields are type-checked and any other field is refused, except Triton's own
    request parameters and the ones in ``also_known`` (the request's flags, which the caller
    reads). `cumulative_logprob`: the generated tokens' log-probabilities are summed (Triton's
    `return_cumulative_logprob`)."""
    _refuse_unknown(parameters, also_known)
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
        timeout_s=timeout_parameter_s(parameters),
        sampling=sampling,
        cumulative_logprob=cumulative_logprob,
        **_structured_output(parameters),
    )


def _structured_output(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM's structured-output fields, one at most: a guided_* field, or a `guided_decoding` or
    `structured_outputs` object holding one kind. gRPC parameters are scalars, so a schema, a list
    of choices or an object may come as JSON text; REST may send them as JSON values too."""
    fields = (*_GUIDED_FIELDS, *_STRUCTURED_OBJECTS)
    given = [key for key in fields if parameters.get(key) is not None]  # null is unset, as in vLLM
    if not given:
        return {}
    if len(given) > 1:
        raise InvalidInputError(f"parameters {given}: give one structured output at most")
    key = given[0]
    if key in _STRUCTURED_OBJECTS:
        kind, value, named = _structured_object(key, _json_value(parameters, key))
    else:
        kind, value, named = _GUIDED_FIELDS[key], parameters[key], key
    return {"structured_output": _structured_kind(kind, value, named), "structured_output_field": key}


def _structured_object(key: str, value: Any) -> tuple[str, Any, str]:
    """The one kind (and its value) of a `guided_decoding` or `structured_outputs` object."""
    if not isinstance(value, dict):
        raise InvalidInputError(f'parameter {key!r} must be an object such as {{"choice": [...]}}')
    unknown = sorted(set(value) - set(_STRUCTURED_KINDS) - set(_STRUCTURED_OPTIONS))
    if unknown:
        raise InvalidInputError(
            f"parameter {key!r}: unsupported key(s) {unknown}; one of {list(_STRUCTURED_KINDS)} is taken"
        )
    kinds = [kind for kind in _STRUCTURED_KINDS if value.get(kind) not in (None, False)]
    if len(kinds) != 1:
        raise InvalidInputError(f"parameter {key!r}: give exactly one of {list(_STRUCTURED_KINDS)}")
    return kinds[0], value[kinds[0]], f"{key}.{kinds[0]}"


def _structured_kind(kind: str, value: Any, named: str) -> StructuredOutput:
    """One structured output of vLLM's ``kind``; errors name the field ``named``."""
    if kind in ("json", "choice") and isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):  # an integer past 4,300 digits is a plain ValueError
            raise InvalidInputError(f"parameter {named!r} is not valid JSON") from None
    if kind == "json":
        if not isinstance(value, dict):
            raise InvalidInputError(f"parameter {named!r} must be a JSON schema object")
        # NaN and Infinity, which Python's JSON reader takes, reached the compiler as null.
        where = first_unwritable(value, named)
        if where is not None:
            raise InvalidInputError(
                f"parameter {named!r}: {where} holds NaN, Infinity or a lone surrogate (\\ud800)"
            )
        return StructuredOutput(json=json.dumps(value))
    if kind == "json_object":
        if value is not True:
            raise InvalidInputError(f"parameter {named!r} must be true")
        return StructuredOutput(json_object=True)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise InvalidInputError(f"parameter {named!r} must be a non-empty list of non-empty strings")
        return StructuredOutput(choice=value)
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"parameter {named!r} must be a non-empty string")
    return StructuredOutput(regex=value) if kind == "regex" else StructuredOutput(grammar=value)


# A day, as the OpenAI routes' `timeout` at most.
_MAX_TIMEOUT_US = 86_400 * 10**6


def timeout_parameter_s(parameters: Mapping[str, Any]) -> float | None:
    """Triton's `timeout` request parameter, in microseconds (what tritonclient's `timeout=` sends),
    in seconds; 0, as in Triton, means none."""
    microseconds = _number(parameters, "timeout", integer=True)
    if not microseconds:
        return None
    if not 0 <= microseconds <= _MAX_TIMEOUT_US:  # a float could not even hold some of those ints
        raise InvalidInputError(
            f"parameter 'timeout' must be a number of microseconds in [0, {_MAX_TIMEOUT_US}]"
        )
    return float(microseconds) / 1e6
