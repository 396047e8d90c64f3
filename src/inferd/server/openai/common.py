"""Pieces the OpenAI endpoints share: sampling params, finish reasons, usage, the error shape,
an embedding's encoding, a classifier's activation option."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, StrictBool
from starlette.responses import JSONResponse

from inferd.engine.outputs import RequestOutput
from inferd.sampling_params import SamplingParams
from inferd.server.errors import (
    ApiError,
    ErrorKind,
    GenerationError,
    InvalidRequestError,
    RequestTimeoutError,
)
from inferd.server.frontend import Frontend
from inferd.server.openai.protocol import UNSERVED_FIELDS, PromptTokensDetails, SamplingExtras, Usage
from inferd.server.structured_request import GUIDED_FIELDS, requested


class ActivationOption(BaseModel):
    """vLLM's ``use_activation`` (``activation`` before it): false gives a classifier's raw label
    logits where its probabilities (softmax, or one label's sigmoid) would be."""

    use_activation: StrictBool | None = None
    activation: StrictBool | None = None

    @property
    def applies_activation(self) -> bool:
        chosen = self.use_activation if self.use_activation is not None else self.activation
        return chosen is not False


# status, OpenAI error type, OpenAI error code
_ERROR_SHAPES: dict[ErrorKind, tuple[int, str, str | None]] = {
    "invalid_request": (400, "invalid_request_error", None),
    "not_found": (404, "invalid_request_error", "model_not_found"),
    "authentication": (401, "invalid_request_error", "invalid_api_key"),
    "generation": (500, "server_error", None),
    "unavailable": (503, "server_error", "service_unavailable"),
    "overloaded": (429, "requests", "rate_limit_exceeded"),
    "timeout": (408, "timeout_error", "request_timeout"),
    "too_large": (413, "invalid_request_error", "request_too_large"),
}


def encode_vector(vector: np.ndarray, encoding: str) -> list[float] | str:
    """An embedding as OpenAI's ``encoding_format`` asks: floats, or base64 of little-endian
    float32 (as the OpenAI SDK decodes it)."""
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32).tolist()


def error_body(error: ApiError) -> dict[str, dict[str, str | None]]:
    _, error_type, code = _ERROR_SHAPES[error.kind]
    code = error.code or code
    return {"error": {"message": error.message, "type": error_type, "param": error.field, "code": code}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=_ERROR_SHAPES[error.kind][0])


def error_event_payload(error: ApiError) -> str:
    """An error that happens after a stream has started goes out as a last `data:` event."""
    return json.dumps(error_body(error))


def refuse_unserved(body: BaseModel) -> None:
    """A 400 naming the first field of ``UNSERVED_FIELDS`` the request gives: it would change the
    answer, and this server does not do what it asks."""
    for name in sorted(body.model_fields_set & UNSERVED_FIELDS.keys()):
        raise InvalidRequestError(f"{name}: not supported: {UNSERVED_FIELDS[name]}", name)


def sampling_params(
    frontend: Frontend,
    body: SamplingExtras,
    max_tokens: int | None,
    logprobs: int | None,
    field_names: Mapping[str, str] | None = None,
) -> SamplingParams:
    """`field_names` maps a SamplingParams field to the body's, for errors that name it. A sampling
    field the request leaves out takes the model's recommended value, where it has one."""
    refuse_unserved(body)
    if body.stream and body.prompt_logprobs is not None and body.prompt_logprobs != 0:
        raise InvalidRequestError(
            "prompt_logprobs: not available when stream is true (0 is accepted and sends none, as vLLM's)",
            "prompt_logprobs",
        )
    structure_fields = ("response_format", "structured_outputs", *GUIDED_FIELDS)
    structure, structure_field = requested({name: getattr(body, name) for name in structure_fields})
    field_names = {**(field_names or {}), "structured_output": structure_field}

    def chosen(name: str) -> Any:
        if name not in body.model_fields_set and name in frontend.sampling_defaults:
            return frontend.sampling_defaults[name]
        return getattr(body, name)

    return frontend.sampling_params(
        field_names,
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        temperature=chosen("temperature"),
        top_p=chosen("top_p"),
        top_k=chosen("top_k"),
        min_p=chosen("min_p"),
        repetition_penalty=chosen("repetition_penalty"),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        # A stream sends no prompt log-probabilities: none computed for it.
        prompt_logprobs=None if body.stream else body.prompt_logprobs,
        logit_bias=_logit_bias(body.logit_bias),
        skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
        structured_output=structure,
        adapter=frontend.adapter_for(body.model),
        priority=body.priority,
        cache_salt=body.cache_salt,
        allowed_token_ids=body.allowed_token_ids,
        bad_words=list(body.bad_words or []),
    )


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI sends token ids as JSON object keys, i.e. strings."""
    result = {}
    for key, value in (bias or {}).items():
        try:
            result[int(key)] = value
        except ValueError:
            raise InvalidRequestError(
                f"logit_bias: keys must be token ids, got {key!r}", "logit_bias"
            ) from None
    return result


def finish_reason(out: RequestOutput) -> Literal["stop", "length"] | None:
    """The OpenAI finish reason of a whole answer; a request cut short otherwise is an error."""
    if not out.finished:
        return None
    if out.finish_reason in ("stop", "length"):
        return out.finish_reason  # type: ignore[return-value]
    if out.finish_reason == "timeout":
        raise RequestTimeoutError("the request timed out and was aborted")
    raise GenerationError(f"the request ended early: {out.finish_reason}")


def stream_finish_reason(out: RequestOutput) -> Literal["stop", "length", "timeout"] | None:
    """As `finish_reason`, but a stream that already started ends a timed-out choice with `timeout`."""
    if out.finished and out.finish_reason == "timeout":
        return "timeout"
    return finish_reason(out)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> Usage:
    """`cached_tokens`: the prompt tokens the prefix cache served (OpenAI's
    `prompt_tokens_details.cached_tokens`); None leaves the details out."""
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=None
        if cached_tokens is None
        else PromptTokensDetails(cached_tokens=cached_tokens),
    )
