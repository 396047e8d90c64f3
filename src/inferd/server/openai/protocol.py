"""OpenAI API request and response bodies (completions, chat completions, models), field by field.

Follows the official API reference; the sampling extras vLLM users rely on (`top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `allowed_token_ids`,
`bad_words`) are accepted as well.
Fields that change the answer and that inferd cannot honour are declared so they can be refused.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from inferd.sampling_params import MAX_SAMPLES


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
    model_config = ConfigDict(extra="ignore")
    # Fields whose null means something of its own, not the default.
    _null_keeps_its_meaning: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """The reference types the optional fields "X or null", and clients send null for a field
        they leave unset: a null field takes its default (a required one is then missing)."""
        if isinstance(data, dict):
            kept = cls._null_keeps_its_meaning
            return {key: value for key, value in data.items() if value is not None or key in kept}
        return data


class StreamOptions(_Body):
    # Unset: OpenAI's default (no usage chunk), unless continuous_usage_stats asks for usage.
    include_usage: bool | None = None
    # vLLM's: every chunk carries the usage so far too (and the usage chunk comes, as vLLM sends
    # it, unless include_usage is false).
    continuous_usage_stats: bool = False

    @property
    def usage_chunk(self) -> bool:
        return self.include_usage if self.include_usage is not None else self.continuous_usage_stats


# vLLM request fields that change the answer and that inferd does not serve, with why: declared so
# that a request giving one is refused (``common.refuse_unserved``) rather than answered without it.
UNSERVED_FIELDS: dict[str, str] = {
    "logits_processors": "custom logits processors are not run by this server",
    "guided_whitespace_pattern": "structured outputs allow the whitespace JSON allows",
    "structural_tag": "structural tags are not served; use structured_outputs or guided_*",
    "vllm_xargs": "no extra arguments are read by this server",
    "kv_transfer_params": "disaggregated prefill (KV transfer) is not served",
    "mm_processor_kwargs": "the served models take text only",
    "prompt_embeds": "prompts are text or token ids here",
}


class SamplingExtras(_Body):
    """Sampling fields shared by completions and chat."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_SAMPLES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extras (vLLM's names and meanings).
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # Keep only the prompt's last k tokens (-1: as many as fit beside max_tokens), as vLLM's.
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    # vLLM's beam search: the n best of n beams; length_penalty ranks finished beams.
    use_beam_search: bool = False
    length_penalty: float = Field(1.0, ge=-10.0, le=10.0)
    # Under --scheduling-policy priority: lower runs first (vLLM's field); else only 0.
    priority: int = 0
    # The prefix cache shares K/V only with requests of the same salt (vLLM's field).
    cache_salt: str | None = Field(None, min_length=1)
    # vLLM's: the prompt's and each choice's token ids in the answer (stream chunks: the new ones).
    return_token_ids: bool = False
    # vLLM's: each prompt token's log-probability, rank and `prompt_logprobs` likeliest alternatives
    # (not streamed: more than 0 with stream is refused, as vLLM does), and logprobs' tokens
    # written as "token_id:N".
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool = False
    # inferd's: seconds until the request is aborted (overrides the server's --request-timeout).
    timeout: float | None = Field(None, gt=0.0, le=86400.0)
    # Structured output (server/structured_request.py): OpenAI's field, vLLM's object and vLLM's
    # older per-kind fields; one at most.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's: the answer's id is made from it (an X-Request-Id header wins), server/request_id.py.
    request_id: str | None = Field(None, pattern=r"^[\x21-\x7e]{1,256}$")
    # vLLM's: whether the tokenizer adds its special tokens (a BOS) to the prompt's text; unset,
    # the route's default (completions yes, chat no: the template writes its own).
    add_special_tokens: bool | None = None
    # vLLM's choice of structured-output library: it picks how, not what (the output is the same
    # constraint's), and llguidance serves every request here, so any name is taken.
    guided_decoding_backend: str | None = None
    # Declared only to be refused (UNSERVED_FIELDS).
    logits_processors: Any = None
    guided_whitespace_pattern: Any = None
    structural_tag: Any = None
    vllm_xargs: Any = None
    kv_transfer_params: Any = None
    mm_processor_kwargs: Any = None

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keeps_a_token(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be -1 or at least 1")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream", False):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @property
    def include_usage_chunk(self) -> bool:
        return self.stream_options is not None and self.stream_options.usage_chunk

    @property
    def continuous_usage(self) -> bool:
        """Every streamed chunk carries the usage so far (vLLM's ``continuous_usage_stats``)."""
        options = self.stream_options
        return options is not None and options.usage_chunk and options.continuous_usage_stats


class CompletionRequest(SamplingExtras):
    # max_tokens: left out, 16 (the reference's default); null, the rest of the context (as vLLM
    # reads it, and the only way to ask for no limit here).
    _null_keeps_its_meaning = frozenset({"max_tokens"})

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    # Up to 20 alternatives, as vLLM takes (OpenAI's own API stops at 5).
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_SAMPLES)  # as n: candidates are engine requests
    suffix: str | None = None
    prompt_embeds: Any = None  # refused (UNSERVED_FIELDS)


class LoadLoraAdapterRequest(_Body):
    """`POST /v1/load_lora_adapter` (vLLM's): a PEFT adapter folder on the server's machine."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapterRequest(_Body):
    lora_name: str = Field(min_length=1)


class TextContentPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    # A JSON object's text, as OpenAI sends it.
    arguments: str


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    # An assistant turn's calls, and a tool turn's answer to one of them.
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # An assistant turn's thinking, as this server answers it (vLLM's field, and `reasoning`, its
    # newer name), handed to the template: Qwen3's writes it back into earlier turns' <think> blocks.
    reasoning_content: str | None = None
    reasoning: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingExtras):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(
        None, ge=1, description="Deprecated by OpenAI; max_completion_tokens wins."
    )
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    # "auto" (the default with tools), "none", "required" or {"type": "function", "function": {"name"}}
    # (those two by constrained decoding: server/forced_tool_calls.py).
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    # Extras (vLLM's names and meanings): how the chat template renders the conversation.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # Declared to be refused: a request's own template (the server's --chat-template applies),
    # and vLLM's chat echo (the last message put before the answer).
    chat_template: str | None = None
    echo: bool = False
    # vLLM's: documents for a retrieval-augmented template (a list of objects), as its variable.
    documents: list[dict[str, str]] | None = None
    # vLLM's: false leaves the thinking (--reasoning-parser) out of the answer.
    include_reasoning: bool = True
    # Candidates ranked by likelihood are served on /v1/completions; here only n of n (refused above).
    best_of: int | None = Field(None, ge=1)


# -- responses ------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    # Prompt tokens whose K/V the prefix cache held (each prompt's first choice's, as computed once).
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # None where no one count stands for the prompt (a beam search's many steps).
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    # None for an echoed prompt's first token, which nothing comes before.
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """One token of a prompt position in vLLM's ``prompt_logprobs``."""

    logprob: float
    # 1 for the likeliest token (the prompt's own token: how many are at least as likely).
    rank: int
    decoded_token: str


# Per prompt token: None for the first, else token id (as text) -> its entry.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    # `timeout` only in streamed chunks: the request ran out of time after its stream started.
    finish_reason: Literal["stop", "length", "timeout"] | None = None
    # vLLM's: the stop string or stop token id that ended the choice; None for EOS or another end.
    stop_reason: int | str | None = None
    # With return_token_ids: the choice's prompt (a stream's first chunk of the choice) and its
    # generated tokens (a stream's chunk: those since the last), the one that ended it included.
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None
    # With prompt_logprobs (vLLM's), in a whole answer.
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    # None where the answer is tool calls and nothing else, as OpenAI sends it.
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    # With --reasoning-parser: the thinking, apart from the answer in `content` (vLLM's field).
    reasoning_content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    stop_reason: int | str | None = None  # as CompletionChoice's
    # With return_token_ids: the generated tokens, the one that ended the answer included.
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    # With return_token_ids: the rendered conversation's tokens.
    prompt_token_ids: list[int] | None = None
    # With prompt_logprobs (vLLM's): the rendered conversation's.
    prompt_logprobs: PromptLogprobs | None = None


class DeltaFunctionCall(BaseModel):
    name: str
    arguments: str


class DeltaToolCall(BaseModel):
    # The call's place among the choice's calls; each call comes whole, in one delta.
    index: int
    id: str
    type: Literal["function"] = "function"
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    # `timeout`: the request ran out of time after its stream started.
    finish_reason: Literal["stop", "length", "tool_calls", "timeout"] | None = None
    stop_reason: int | str | None = None  # with the last chunk, as CompletionChoice's
    # With return_token_ids: the tokens generated since the choice's last chunk.
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    # With return_token_ids: the conversation's tokens, on the role chunk that opens the stream.
    prompt_token_ids: list[int] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "inferd"
    max_model_len: int
    # A LoRA adapter's base model (vLLM's field); None for the base model itself.
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- tokenizer endpoints (vLLM's shapes) ------------------------------------------------------------
class TgiTokenizeParameters(_Body):
    # TGI's: keep only the input's last this-many tokens.
    truncate: int | None = Field(None, ge=1)


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # TGI's body ({"inputs": text}) on the same path: answered in TGI's shape, a list of SimpleTokens.
    inputs: str | None = None
    parameters: TgiTokenizeParameters | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    # A conversation is rendered as the chat route renders it, from the same fields.
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None  # refused, as on the chat route
    # vLLM's: each token's vocabulary entry too (as the tokenizer writes it, "Ġ" and all).
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class SimpleToken(BaseModel):
    """TGI's ``/tokenize`` answer, one per token: its id, and the characters ``[start, stop)`` of the
    input it came from (empty for a special token the tokenizer added) with their text."""

    id: int
    text: str
    start: int
    stop: int


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
