"""vLLM's chat form of a pooling request (``/v1/embeddings``, ``/classify``, ``/pooling``): a
conversation in ``messages`` instead of ``input``, rendered by the model's chat template into one
input, as vLLM's ``EmbeddingChatRequest`` and ``ClassificationChatRequest`` take it. No generation
prompt is added unless asked: the conversation itself is what is pooled."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inferd.engine.tokenizer import InvalidTextError
from inferd.server.errors import InvalidRequestError
from inferd.server.frontend import Frontend
from inferd.server.openai.chat import template_kwargs, template_messages
from inferd.server.openai.protocol import ChatMessage


class PoolingChatFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


def read_chat_fields(body: dict[str, Any]) -> PoolingChatFields:
    """The chat fields of a request body (a 400 naming the field that does not read)."""
    try:
        return PoolingChatFields.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "messages"
        raise InvalidRequestError(f"{field}: {error['msg']}", field) from None


def chat_input(frontend: Frontend, fields: PoolingChatFields, has_input: bool) -> list[int] | None:
    """The conversation's token ids as the chat template renders it (None without ``messages``:
    the request's ``input`` is pooled instead); both at once is a 400."""
    if fields.messages is None:
        return None
    if has_input:
        raise InvalidRequestError("input: give input or messages, not both", "input")
    variables = template_kwargs(
        fields.chat_template_kwargs,
        fields.messages,
        fields.add_generation_prompt,
        fields.continue_final_message,
    )
    prompt = frontend.render_chat(
        template_messages(fields.messages),
        fields.add_generation_prompt,
        variables,
        fields.continue_final_message,
    )
    # The template writes the special tokens it wants: none added again.
    try:
        return frontend.tokenizer.encode(prompt, add_special_tokens=False)
    except InvalidTextError as exc:
        raise InvalidRequestError(str(exc), "messages") from None
