"""Text Generation Inference (TGI) request and response bodies: `/generate`, `/generate_stream`, `/info`.

Follows TGI's OpenAPI schema. An option that changes the answer and that inferd cannot honour
(`watermark`) is declared so that setting it gets a 422 rather than being silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["length", "eos_token", "stop_sequence"]


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    best_of: int | None = Field(None, ge=1)
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # TGI's default; an explicit null means "up to the end of the context".
    max_new_tokens: int | None = Field(100, ge=1)
    # TGI's bound; the engine's own upper bound is checked where the sampling parameters are made.
    repetition_penalty: float | None = Field(None, gt=0.0)
    return_full_text: bool | None = False
    seed: int | None = Field(None, ge=0, le=2**64 - 1)  # TGI's seed is a u64
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = Field(None, gt=0.0, le=100.0)
    top_k: int | None = Field(None, gt=0)
    top_n_tokens: int | None = Field(None, ge=0, le=5)
    # Checked with TGI's messages in `prepare_generate` (top_p in (0, 1), truncate up to the
    # model's input tokens).
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = Field(None, gt=0.0, lt=1.0)
    watermark: bool = False
    grammar: dict[str, Any] | None = None
    adapter_id: str | None = None

    @property
    def sampling(self) -> bool:
        """TGI samples when asked to, or when a setting changes the distribution (a temperature
        other than 1, a top-k, a top-p or typical-p below 1); otherwise it is greedy."""
        changes_distribution = (
            (self.temperature is not None and self.temperature != 1.0)
            or self.top_k is not None
            or (self.top_p is not None and self.top_p < 1.0)
            or self.typical_p is not None
        )
        return self.do_sample or changes_distribution


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    input_length: int
    seed: int | None


class BestOfSequence(StreamDetails):
    """One of the other candidates of a `best_of` request (TGI's `best_of_sequences`)."""

    generated_text: str
    prefill: list[Token] = Field(default_factory=list)
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class Details(StreamDetails):
    prefill: list[Token] = Field(default_factory=list)
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class Info(BaseModel):
    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str = "text-generation"
    max_concurrent_requests: int
    max_best_of: int = 1
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int = 1
    max_client_batch_size: int = 1
    router: str = "inferd"
    version: str
    sha: str | None = None
    docker_label: str | None = None
