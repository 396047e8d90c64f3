"""LLMEngine: the synchronous engine with text in and text out, shared by the offline and async APIs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from inferd.config import EngineConfig
from inferd.engine.builder import build_engine_config, resolve_num_blocks
from inferd.engine.core import EngineCore, EngineStats
from inferd.engine.input_processor import InputProcessor, Prompt, PromptError
from inferd.engine.output_processor import OutputProcessor
from inferd.engine.outputs import RequestOutput
from inferd.engine.request import FinishReason
from inferd.engine.tokenizer import Tokenizer
from inferd.sampling_params import SamplingParams
from inferd.worker.model_runner import ModelRunner

__all__ = ["LLMEngine", "Prompt", "PromptError"]

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.tokenizer = Tokenizer(config.tokenizer_path)
        runner = ModelRunner(config)
        try:
            self.config = resolve_num_blocks(config)
            self.core = EngineCore(self.config, runner)
        except BaseException:
            runner.shutdown()
            raise
        self.inputs = InputProcessor(self.config, self.tokenizer)
        self.eos_token_ids = self.inputs.eos_token_ids
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids)
        self.max_model_len = config.scheduler.max_model_len

    @classmethod
    def from_options(cls, model_path: str | Path | None = None, **options: Any) -> LLMEngine:
        return cls(build_engine_config(model_path, **options))

    def shutdown(self) -> None:
        """Stop what runs outside this process (tensor-parallel ranks); the engine is unusable after."""
        self.core.shutdown()

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        arrival_time: float | None = None,
        final_only: bool = False,
        clamp_to_context: bool = False,
    ) -> list[int]:
        """Validate and queue a request; returns its prompt token ids. With ``final_only`` the
        request's one output comes when it finishes (its text decoded then, in one go);
        ``clamp_to_context``: a ``max_tokens`` past the context gets what is left, not an error."""
        if request_id in self.output_processor:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = self.inputs.make_request(request_id, prompt, params, arrival_time, clamp_to_context)
        self.core.add_request(request)
        self.output_processor.add(
            request_id, request.prompt_token_ids, params, request.arrival_time, final_only
        )
        return request.prompt_token_ids

    def load_adapter(self, name: str, path: str) -> None:
        """Serve a LoRA adapter from now on (``core.LoraUpdateError`` if it cannot be)."""
        self.core.load_adapter(name, path)
        self.inputs.lora_names = (*self.inputs.lora_names, name)

    def unload_adapter(self, name: str) -> None:
        """Stop serving a LoRA adapter no request uses (``core.LoraUpdateError`` if it cannot be)."""
        self.core.unload_adapter(name)
        self.inputs.lora_names = tuple(n for n in self.inputs.lora_names if n != name)

    def step(self) -> list[RequestOutput]:
        processed = self.output_processor.process(self.core.step())
        self.core.abort(processed.stopped, FinishReason.STOP)
        self.core.abort(processed.failed, FinishReason.ERROR)
        return processed.outputs

    def abort(self, request_ids: list[str], reason: FinishReason = FinishReason.ABORT) -> list[RequestOutput]:
        """End requests wherever they are; their blocks are free when this returns."""
        self.core.abort(request_ids, reason)
        finished = [self.output_processor.finish(i, reason.value) for i in request_ids]
        return [out for out in finished if out is not None]

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def check_alive(self) -> None:
        """Nothing to check: the core runs in this process (ProcessLLMEngine's can die apart)."""

    def stats(self) -> EngineStats:
        return self.core.stats()

    def reset_prefix_cache(self) -> None:
        self.core.reset_prefix_cache()
