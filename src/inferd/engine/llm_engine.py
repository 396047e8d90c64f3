"""LLMEngine: the synchronous engine with text in and text out, shared by the offline and async APIs."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from inferd.config import EngineConfig
from inferd.engine.builder import build_engine_config, resolve_num_blocks
from inferd.engine.core import EngineCore, EngineStats
from inferd.engine.output_processor import OutputProcessor
from inferd.engine.outputs import RequestOutput
from inferd.engine.request import FinishReason, Request
from inferd.engine.tokenizer import Tokenizer
from inferd.sampling_params import SamplingParams
from inferd.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class PromptError(ValueError):
    """The prompt cannot be served (empty, too long, bad token ids); the message says why."""


def read_eos_token_ids(path: Path, tokenizer: Tokenizer) -> frozenset[int]:
    """EOS ids from generation_config.json, else config.json, else the tokenizer's EOS token."""
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.is_file():
            value = json.loads(file.read_text()).get("eos_token_id")
            if value is not None:
                return frozenset(value if isinstance(value, list) else [value])
    return frozenset([tokenizer.eos_token_id]) if tokenizer.eos_token_id is not None else frozenset()


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.tokenizer = Tokenizer(config.model_path)
        runner = ModelRunner(config)
        self.config = resolve_num_blocks(config)
        self.core = EngineCore(self.config, runner)
        self.eos_token_ids = read_eos_token_ids(config.model_path, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.max_model_len = config.scheduler.max_model_len

    @classmethod
    def from_options(cls, model_path: str | Path | None = None, **options: Any) -> LLMEngine:
        return cls(build_engine_config(model_path, **options))

    def tokenize_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise PromptError("prompt is empty")
            return self.tokenizer.encode(prompt)
        if not prompt:
            raise PromptError("prompt is empty")
        vocab = self.config.model.vocab_size
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise PromptError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        return list(prompt)

    def resolve_max_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """Check the context limit; returns the output budget (what is left when unset)."""
        room = self.max_model_len - num_prompt_tokens
        if room <= 0:
            raise PromptError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt has "
                f"{num_prompt_tokens} tokens"
            )
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:
            raise PromptError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{num_prompt_tokens} tokens and max_tokens asks for {params.max_tokens} more "
                f"({num_prompt_tokens + params.max_tokens} in all)"
            )
        return params.max_tokens

    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams, arrival_time: float | None = None
    ) -> list[int]:
        """Validate and queue a request; returns its prompt token ids."""
        if request_id in self.output_processor:
            raise ValueError(f"request id {request_id!r} is already in use")
        token_ids = self.tokenize_prompt(prompt)
        max_output = self.resolve_max_tokens(len(token_ids), params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        request = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            params=params,
            eos_token_ids=self.eos_token_ids,
            max_output_tokens=max_output,
            arrival_time=arrival,
        )
        self.core.add_request(request)
        self.output_processor.add(request_id, token_ids, params, arrival)
        return token_ids

    def step(self) -> list[RequestOutput]:
        outputs, stopped = self.output_processor.process(self.core.step())
        if stopped:
            self.core.abort(stopped, FinishReason.STOP)
        return outputs

    def abort(self, request_ids: list[str], reason: FinishReason = FinishReason.ABORT) -> list[RequestOutput]:
        """End requests wherever they are; their blocks are free when this returns."""
        self.core.abort(request_ids, reason)
        finished = [self.output_processor.finish(i, reason.value) for i in request_ids]
        return [out for out in finished if out is not None]

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def stats(self) -> EngineStats:
        return self.core.stats()
