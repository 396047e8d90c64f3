"""An LLM's v2 request and response tensors, as Triton's vLLM backend lays them out.

A request holds `text_input` (one BYTES element) and, optionally, BOOL tensors of one element:
`stream` (a `ModelStreamInfer` request answered delta by delta), `exclude_input_in_output` and the
`return_*` flags that add output tensors (`finish_reason`, `num_input_tokens`,
`num_output_tokens`, `cumulative_logprob`); and a BYTES `sampling_parameters` tensor holding the
sampling fields as one JSON object (values may be text: `{"max_tokens": "100"}`), which its
clients send instead of, or beside, request parameters. Each of those flags may also come as a
request parameter (the REST generate extension's top-level fields are parameters).

Where this server differs from that backend: the prompt is left out of `text_output` unless
`exclude_input_in_output` is false (its backend puts it in front of a whole answer by default), as
every other route here answers; and `return_logprobs` is refused (ranks are not computed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from inferd.serving.config import TensorSpec
from inferd.serving.datatypes import numpy_dtype
from inferd.serving.errors import InvalidInputError
from inferd.serving.generation import flag
from inferd.serving.runtimes.base import GenerationStream
from inferd.serving.tensor import InferRequest, Parameters, Tensor

TEXT_INPUT = TensorSpec("text_input", "BYTES", (1,))
TEXT_OUTPUT = TensorSpec("text_output", "BYTES", (1,))
SAMPLING_PARAMETERS = "sampling_parameters"
STREAM = "stream"
EXCLUDE_INPUT = "exclude_input_in_output"
# The flag that asks for each extra output, and that output's datatype.
EXTRA_OUTPUTS = {
    "finish_reason": ("return_finish_reason", "BYTES"),
    "num_input_tokens": ("return_num_input_tokens", "UINT32"),
    "num_output_tokens": ("return_num_output_tokens", "UINT32"),
    "cumulative_logprob": ("return_cumulative_logprob", "FP32"),
}
# The extra outputs read from a `GenerationStream`'s counts, and the attribute each reads.
COUNTS = {
    "num_input_tokens": "prompt_tokens",
    "num_output_tokens": "completion_tokens",
    "cumulative_logprob": "cumulative_logprob",
}
_FLAG_INPUTS = (STREAM, EXCLUDE_INPUT, *(flag_name for flag_name, _ in EXTRA_OUTPUTS.values()))
# The optional inputs and the extra outputs, as the model's metadata and configuration list them.
OPTIONAL_INPUTS = (
    TensorSpec(SAMPLING_PARAMETERS, "BYTES", (1,)),
    *(TensorSpec(name, "BOOL", (1,)) for name in _FLAG_INPUTS),
)
EXTRA_OUTPUT_SPECS = tuple(TensorSpec(name, datatype, (1,)) for name, (_, datatype) in EXTRA_OUTPUTS.items())
_REFUSED_FLAGS = {"return_logprobs": "per-token log-probabilities are served on the OpenAI routes"}
# The flags a request's parameters may hold beside its sampling fields (read here, not sampling).
FLAG_PARAMETERS = frozenset((*_FLAG_INPUTS, *_REFUSED_FLAGS))


@dataclass(frozen=True)
class LLMRequest:
    prompt: str
    # Request parameters with the `sampling_parameters` tensor's fields over them.
    parameters: dict[str, Any]
    # The `stream` tensor or parameter; None when neither is given.
    stream: bool | None
    # Whether the prompt goes in front of `text_output` (`exclude_input_in_output` false).
    echo_prompt: bool
    # The extra outputs asked for (names of EXTRA_OUTPUTS), in that order.
    extras: tuple[str, ...]
    # The outputs the request listed; empty: text_output and the extras.
    listed: tuple[str, ...]

    def outputs(
        self, text: str, stream: GenerationStream, finish_reason: str | None, new_tokens: int
    ) -> list[Tensor]:
        """One response's tensors: `text` (a delta, or the whole answer) and the extras, counted
        from `stream` (`new_tokens`: the output tokens this response carries; `finish_reason`:
        None before the last one, sent as "None" as that backend sends it)."""
        values = {  # read only where asked for
            "finish_reason": lambda: [str(finish_reason).encode()],
            "num_input_tokens": lambda: [stream.prompt_tokens],
            "num_output_tokens": lambda: [new_tokens],
            "cumulative_logprob": lambda: [stream.cumulative_logprob or 0.0],
        }
        tensors = {TEXT_OUTPUT.name: _text_tensor(self.prompt + text if self.echo_prompt else text)}
        for name in self.extras:
            datatype = EXTRA_OUTPUTS[name][1]
            tensors[name] = Tensor(name, datatype, np.array(values[name](), dtype=numpy_dtype(datatype)))
        return [tensors[name] for name in self.listed or tensors]


def _text_tensor(text: str) -> Tensor:
    return Tensor(TEXT_OUTPUT.name, "BYTES", np.array([text.encode("utf-8")], dtype=object))


def read_llm_request(request: InferRequest) -> LLMRequest:
    """The prompt, sampling parameters and flags of an LLM's infer request (errors name the tensor)."""
    tensors = {tensor.name: tensor for tensor in request.inputs}
    if len(tensors) != len(request.inputs):
        raise InvalidInputError("an input tensor is given twice")
    known = {TEXT_INPUT.name, SAMPLING_PARAMETERS, *_FLAG_INPUTS}
    unknown = sorted(set(tensors) - known - set(_REFUSED_FLAGS))
    if unknown or TEXT_INPUT.name not in tensors:
        raise InvalidInputError(
            f"LLM models take the input 'text_input' and optionally {sorted(known - {TEXT_INPUT.name})}, "
            f"got {sorted(tensors)}"
        )
    parameters: dict[str, Any] = dict(request.parameters)
    if SAMPLING_PARAMETERS in tensors:
        parameters.update(_sampling_parameters(tensors[SAMPLING_PARAMETERS]))
    flags: Parameters = {name: _bool_tensor(tensors[name]) for name in _FLAG_INPUTS if name in tensors}
    for name, reason in _REFUSED_FLAGS.items():
        if name in tensors and _bool_tensor(tensors[name]) is True:
            raise InvalidInputError(f"{name!r} is not supported: {reason}")
    return llm_request(_text(tensors[TEXT_INPUT.name]), {**parameters, **flags}, request)


def llm_request(prompt: str, parameters: dict[str, Any], request: InferRequest | None = None) -> LLMRequest:
    """From a prompt and parameters holding the flags (the REST generate extension's form)."""
    for name, reason in _REFUSED_FLAGS.items():
        if flag(parameters, name) is True:
            raise InvalidInputError(f"{name!r} is not supported: {reason}")
    stream = flag(parameters, STREAM)
    exclude = flag(parameters, EXCLUDE_INPUT)
    if stream and exclude is False:
        raise InvalidInputError("exclude_input_in_output false cannot be streamed: each response is a delta")
    extras = tuple(name for name, (flag_name, _) in EXTRA_OUTPUTS.items() if flag(parameters, flag_name))
    listed: list[str] = []
    for requested in request.outputs if request is not None else ():
        if requested.name not in (TEXT_OUTPUT.name, *EXTRA_OUTPUTS):
            raise InvalidInputError(
                f"unknown output {requested.name!r}; the model has {[TEXT_OUTPUT.name, *EXTRA_OUTPUTS]}"
            )
        if requested.name in listed:
            raise InvalidInputError(f"output {requested.name!r} is asked for twice")
        if "classification" in requested.parameters:
            raise InvalidInputError(f"output {requested.name!r}: classification does not apply")
        listed.append(requested.name)
    # An extra output listed by name is produced whether or not its flag is given.
    extras = tuple(name for name in EXTRA_OUTPUTS if name in extras or name in listed)
    return LLMRequest(prompt, parameters, stream, exclude is False, extras, tuple(listed))


def _one_element(tensor: Tensor, datatype: str) -> Any:
    if tensor.datatype != datatype or tensor.data.size != 1:
        raise InvalidInputError(f"input {tensor.name!r} must be {datatype} with one element")
    return tensor.data.reshape(-1)[0]


def _text(tensor: Tensor) -> str:
    try:
        return bytes(_one_element(tensor, "BYTES")).decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"input {tensor.name!r} is not valid UTF-8: {exc}") from None


def _bool_tensor(tensor: Tensor) -> bool:
    return bool(_one_element(tensor, "BOOL"))


def _sampling_parameters(tensor: Tensor) -> dict[str, Any]:
    try:
        value = json.loads(_text(tensor))
    except (ValueError, RecursionError):  # an integer past 4,300 digits is a plain ValueError
        raise InvalidInputError(f"input {SAMPLING_PARAMETERS!r} is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"input {SAMPLING_PARAMETERS!r} must be a JSON object")
    return value
