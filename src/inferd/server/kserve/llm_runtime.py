"""LLMs as v2 `llm` runtimes: the `TextGenerator` interface over the server's Frontend.

Going through the Frontend (not the engine directly) means v2 LLM requests are tokenized, checked,
counted in the Prometheus metrics and logged exactly like OpenAI and TGI ones. The served LLM of
`inferd serve` is adapted as it is; an `llm` folder of the model repository gets its own engine and
Frontend (`RepositoryLLMLoader`), shut down with the repository.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

from inferd.engine.admission import QueueLimits
from inferd.engine.async_llm import AsyncLLM
from inferd.sampling_params import SamplingParams
from inferd.server.errors import ApiError
from inferd.server.frontend import Frontend, IndexedOutput
from inferd.server.metrics import ServerMetrics
from inferd.serving.config import ConfigError, ModelConfig, resolve_artifact
from inferd.serving.errors import (
    InferenceError,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    RequestTimedOutError,
    ServerOverloadedError,
)
from inferd.serving.llm_io import TEXT_INPUT, TEXT_OUTPUT
from inferd.serving.repository import ModelEntry
from inferd.serving.runtimes.base import GenerationParams, GenerationResult
from inferd.serving.runtimes.registry import RuntimeRegistry

logger = logging.getLogger(__name__)

# How often an unload or a reload looks whether the old engine's generations have ended.
_DRAIN_POLL_S = 0.01

# The `platform` of LLMs in v2 model metadata.
LLM_PLATFORM = "inferd_llm"

# `parameters` of an `llm` model.json that are passed to `AsyncLLM.from_options` as they are.
ENGINE_PARAMETERS = frozenset(
    {
        "kv_cache_memory",
        "max_model_len",
        "max_num_seqs",
        "max_num_batched_tokens",
        "long_prefill_token_threshold",
        "block_size",
        "dtype",
        "device",
        "seed",
        "enable_prefix_caching",
        "max_tokens_cap",
    }
)
# `parameters` that bound the model's admission queue (`QueueLimits`), as `inferd serve`'s
# --max-queued-requests and --max-queued-tokens bound the served LLM's.
QUEUE_PARAMETERS = {"max_queued_requests": "max_requests", "max_queued_tokens": "max_tokens"}

_ERROR_BY_KIND: dict[str, type[InferenceError]] = {
    "invalid_request": InvalidInputError,
    "not_found": ModelNotFoundError,
    "unavailable": ModelNotReadyError,
    # A full queue: 429 + Retry-After over REST, RESOURCE_EXHAUSTED over gRPC (both "retry later").
    "overloaded": ServerOverloadedError,
    "timeout": RequestTimedOutError,
}


def as_inference_error(exc: ApiError) -> InferenceError:
    """A Frontend error in the v2 data plane's terms; failures of the engine itself stay server errors."""
    return _ERROR_BY_KIND.get(exc.kind, InferenceError)(exc.message)


def sampling_params(frontend: Frontend, params: GenerationParams) -> SamplingParams:
    """v2 generation fields -> validated SamplingParams; unset fields keep SamplingParams' defaults."""
    fields: dict[str, Any] = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "seed": params.seed,
    }
    chosen = {name: value for name, value in fields.items() if value is not None}
    chosen.update(params.sampling)
    # Errors name the request's parameter (`lora_name` is vLLM's name of the adapter).
    names = {"structured_output": params.structured_output_field, "adapter": "lora_name"}
    try:
        return frontend.sampling_params(
            names, stop=list(params.stop), structured_output=params.structured_output, **chosen
        )
    except ApiError as exc:
        raise as_inference_error(exc) from exc


class FrontendGenerationStream:
    """Text deltas of one engine request; `result()` once iteration has ended. Its prompt is
    tokenized and checked as the iteration starts (on the frontend's preparing thread, not the
    event loop), so a prompt at fault fails the first step, before any output."""

    def __init__(
        self,
        frontend: Frontend,
        text: str,
        params: SamplingParams,
        timeout_s: float | None,
        cumulative_logprob: bool,
    ) -> None:
        self._frontend = frontend
        self._text = text
        self._params = params
        self._timeout_s = timeout_s
        self._result: GenerationResult | None = None
        self.prompt_tokens = 0  # known once the prompt is tokenized
        self.completion_tokens = 0
        self.cumulative_logprob: float | None = 0.0 if cumulative_logprob else None

    async def _started(self) -> AsyncIterator[IndexedOutput]:
        frontend = self._frontend
        try:
            text, params = self._text, self._params
            token_ids = await frontend.off_loop(frontend.prepare, text, params, field="text_input")
            self.prompt_tokens = len(token_ids)
            request_id = frontend.new_request_id("v2")
            return frontend.generate(request_id, [token_ids], params, timeout_s=self._timeout_s)
        except ApiError as exc:
            raise as_inference_error(exc) from exc

    async def __aiter__(self) -> AsyncIterator[str]:
        # Closing the Frontend's iterator, also when our consumer leaves early (a client that
        # disconnects from generate_stream), aborts the engine request and frees its KV blocks.
        async with aclosing(await self._started()) as outputs:  # type: ignore[type-var]
            try:
                async for item in outputs:
                    out = item.output
                    self.completion_tokens = len(out.token_ids)
                    if self.cumulative_logprob is not None:
                        self.cumulative_logprob += sum(entry.logprob for entry in out.new_logprobs)
                    if out.new_text:
                        yield out.new_text
                    if out.finished and out.finish_reason == "timeout":
                        # As the other protocols: a 408 (DEADLINE_EXCEEDED), not a cut-off text.
                        raise RequestTimedOutError("the request timed out and was aborted")
                    if out.finished:
                        self._result = GenerationResult(
                            text=out.text,
                            finish_reason=out.finish_reason or "stop",
                            prompt_tokens=len(out.prompt_token_ids),
                            completion_tokens=len(out.token_ids),
                            cumulative_logprob=self.cumulative_logprob,
                        )
            except ApiError as exc:
                raise as_inference_error(exc) from exc

    def result(self) -> GenerationResult:
        if self._result is None:
            raise InferenceError("the generation ended before the engine finished the request")
        return self._result


class FrontendTextGenerator:
    """The `TextGenerator` of one LLM: sampling checks happen in `generate`, prompt checks in its
    stream's first step, both before any output, so a bad request fails as invalid input before a
    stream's first byte."""

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    def unready_reason(self) -> str | None:
        """Why the model cannot take requests now (`HealthReportingRuntime`), as `/health` says it."""
        if self.frontend.draining:
            return "the server is shutting down"
        if not self.frontend.llm.is_alive:
            return self.frontend.llm.dead_reason or "the engine is not running"
        return None

    def generate(self, text: str, params: GenerationParams) -> FrontendGenerationStream:
        frontend = self.frontend
        sampling = sampling_params(frontend, params)
        try:
            timeout_s = frontend.timeout_s(None, params.timeout_s)
        except ApiError as exc:
            raise as_inference_error(exc) from exc
        return FrontendGenerationStream(frontend, text, sampling, timeout_s, params.cumulative_logprob)


class RepositoryLLM(FrontendTextGenerator):
    """An LLM loaded from a model folder: owns its engine, which `close()` stops."""

    async def drain(self) -> None:
        """Returns once no generation of this engine is in flight (before an unload or a reload)."""
        while self.frontend.num_in_flight:
            await asyncio.sleep(_DRAIN_POLL_S)

    def close(self) -> None:
        self.frontend.llm.shutdown()
        self.frontend.close()
        # Its gauges leave /metrics with it (a reloaded model's engine has replaced them already).
        self.frontend.metrics.forget_engine()
        logger.info("LLM %r stopped", self.frontend.model_name)


def _limit(key: str, value: object) -> int | None:
    """A limit from model.json: a positive integer, or null for none (lifting the server's)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"llm parameter {key} must be a positive integer or null, got {value!r}")
    return value


class RepositoryLLMLoader:
    """The `llm` runtime loader of a server: each model gets its own engine, and its metrics join the
    served LLM's (same registry, labelled with the model's name). The server's request timeout,
    queue limits and output token cap apply to each model whose parameters do not set their own."""

    def __init__(
        self,
        metrics: ServerMetrics,
        request_timeout_s: float | None = None,
        queue_limits: QueueLimits | None = None,
        max_tokens_cap: int | None = None,
    ) -> None:
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s
        self.queue_limits = queue_limits or QueueLimits()
        self.max_tokens_cap = max_tokens_cap

    def __call__(self, model_dir: Path, config: ModelConfig) -> RepositoryLLM:
        path = resolve_artifact(model_dir, config, ".")
        options = dict(config.parameters)
        known_keys = ENGINE_PARAMETERS | QUEUE_PARAMETERS.keys()
        unknown = sorted(set(options) - known_keys)
        if unknown:
            known = ", ".join(sorted(known_keys))
            raise ConfigError(f"unknown llm parameter(s) {', '.join(unknown)}; known: {known}")
        limits = {field: getattr(self.queue_limits, field) for field in QUEUE_PARAMETERS.values()}
        for key, field in QUEUE_PARAMETERS.items():
            if key in options:
                limits[field] = _limit(key, options.pop(key))
        options["max_tokens_cap"] = _limit(
            "max_tokens_cap", options.get("max_tokens_cap", self.max_tokens_cap)
        )
        logger.info("loading LLM %r from %s", config.name, path)
        llm = AsyncLLM.from_options(path, queue_limits=QueueLimits(**limits), **options)
        metrics = self.metrics.for_model(config.name, llm.stats)
        llm.start()
        return RepositoryLLM(Frontend(llm, config.name, metrics, self.request_timeout_s))


def served_llm_entry(frontend: Frontend) -> ModelEntry:
    """The repository entry of the LLM that `inferd serve` loaded, under its served model name."""
    config = ModelConfig(
        name=frontend.model_name, runtime="llm", inputs=(TEXT_INPUT,), outputs=(TEXT_OUTPUT,)
    )
    return ModelEntry(
        name=config.name, config=config, platform=LLM_PLATFORM, runtime=FrontendTextGenerator(frontend)
    )


def register_llm_runtime(runtimes: RuntimeRegistry, served: Frontend) -> None:
    """Lets `runtime: "llm"` model folders load, their metrics next to those of the served LLM."""
    # The server's defaults: its timeout, queue limits and output cap.
    loader = RepositoryLLMLoader(
        served.metrics, served.request_timeout_s, served.llm.admission.limits, served.max_tokens_cap
    )
    runtimes.register("llm", loader, platform=LLM_PLATFORM)
