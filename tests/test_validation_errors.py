"""A request the protocol's models refuse is one 400 naming where in the body it went wrong, in the
request's own terms: no pydantic union-branch tags (``str``, ``list[...]``, a class name)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from inferd.server.errors import from_validation_error
from inferd.server.openai.protocol import ChatCompletionRequest
from inferd.server.openai.responses_protocol import ResponsesRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
IMAGE_PART = {"type": "image_url", "image_url": {"url": "x"}}


def _error(model: type[BaseModel], body: dict[str, Any]) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as refused:
        model.model_validate(body)
    # As FastAPI reports a body's errors: each place under "body".
    errors = [{**error, "loc": ("body", *error["loc"])} for error in refused.value.errors()]
    error = from_validation_error(RequestValidationError(errors))
    return error.message, error.field


@pytest.mark.parametrize(
    ("model", "body", "message", "field"),
    [
        # No branch takes it: the one that got furthest into the value says why.
        (ResponsesRequest, {"model": "m", "input": ["hello"]}, "input.0: Input should be a valid dictionary",
         "input"),
        (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": [IMAGE_PART]}]},
         "messages.0.content.0.type: Input should be 'text'", "messages"),
        # Branches that fail at the same place are joined.
        (ChatCompletionRequest, {**CHAT, "tool_choice": 5},
         "tool_choice: Input should be a valid string, or Input should be a valid dictionary", "tool_choice"),
        # A mapping's keys stay in the place named.
        (ChatCompletionRequest, {**CHAT, "logit_bias": {"50": "much"}},
         "logit_bias.50: Input should be a valid number, unable to parse string as a number", "logit_bias"),
        # A validator's own message, without pydantic's "Value error, " before it.
        (ChatCompletionRequest, {**CHAT, "stream_options": {"include_usage": True}},
         "stream_options: stream_options is only allowed when stream is true", "stream_options"),
        (ResponsesRequest, {"model": "m", "input": "x", "user": "\ud800"},
         "body.user: holds a lone surrogate (\\ud800) or a number JSON cannot hold (NaN, Infinity)", None),
    ],
)  # fmt: skip
def test_a_refused_value_is_named_by_its_place_in_the_body(
    model: type[BaseModel], body: dict[str, Any], message: str, field: str
) -> None:
    assert _error(model, body) == (message, field)
