"""What a runtime is: a tensor model called on whole batches, or a text generator (LLM).

A loader builds one from a model folder and its config; the registry maps runtime names to loaders.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from inferd.serving.config import ModelConfig
from inferd.structured.spec import StructuredOutput


@runtime_checkable
class TensorRuntime(Protocol):
    """A classic model. Called from a worker thread, never on the event loop.

    `infer` receives one array per configured input (with the batch dimension first when the model's
    `max_batch_size > 0`) and returns one array per configured output, batch dimension first too.
    """

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class GenerationParams:
    """Sampling fields of the v2 generate extension; None leaves the engine's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Seconds before the request is aborted as timed out: Triton's request parameter `timeout`
    # (microseconds) or the REST header X-Request-Timeout (seconds); None: the server's default.
    timeout_s: float | None = None
    # vLLM's guided_json / guided_regex / guided_choice / guided_grammar, and which one was given.
    structured_output: StructuredOutput | None = None
    structured_output_field: str = ""
    # The other vLLM sampling fields Triton's vLLM backend takes (penalties, min_p, min_tokens,
    # ignore_eos, stop_token_ids, ...; `lora_name` as `adapter`), as SamplingParams names them.
    sampling: Mapping[str, Any] = field(default_factory=dict)
    # Whether the generated tokens' log-probabilities are summed (`GenerationStream.cumulative_logprob`).
    cumulative_logprob: bool = False


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    # The generated tokens' summed log-probability; None unless asked for.
    cumulative_logprob: float | None = None


class GenerationStream(Protocol):
    """Async iteration yields text deltas; `result()` is valid once iteration has finished. The
    counts grow as the deltas come (a delta may carry several tokens, or follow tokens of no text);
    they are read only for a request that asks for the outputs made from them (Triton's `return_*`
    flags), so a runtime without them serves every other request."""

    def __aiter__(self) -> AsyncIterator[str]: ...

    def result(self) -> GenerationResult: ...

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far."""
        ...

    @property
    def cumulative_logprob(self) -> float | None:
        """Their summed log-probability so far; None unless asked for."""
        ...


@runtime_checkable
class TextGenerator(Protocol):
    """The `llm` runtime interface; the LLM engine provides the real implementation."""

    def generate(self, text: str, params: GenerationParams) -> GenerationStream: ...


Runtime = TensorRuntime | TextGenerator
RuntimeLoader = Callable[[Path, ModelConfig], Runtime]
