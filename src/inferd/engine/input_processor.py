"""Prompt checks and Request creation: read-only work that any thread or process can do."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from inferd.config import EngineConfig, read_json_object
from inferd.engine.request import Request
from inferd.engine.tokenizer import InvalidTextError, Tokenizer
from inferd.sampling_params import SamplingParams

Prompt = str | list[int]


logger = logging.getLogger(__name__)


PRIORITY_NEEDS_POLICY = (
    "priority {} asked for, but this engine schedules first come, first served (start it with "
    "--scheduling-policy priority)"
)


class PromptError(ValueError):
    """The prompt cannot be served (empty, too long, bad token ids); the message says why."""


def read_eos_token_ids(path: Path, tokenizer: Tokenizer) -> frozenset[int]:
    """The ids that end an output: generation_config.json's (else config.json's) and the tokenizer's
    EOS token. Both, as vLLM takes them: a chat model's generation config may list its end-of-turn
    token alone while its tokenizer's EOS is another token, and either one ends the answer."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.is_file():
            value = read_json_object(file).get("eos_token_id")
            if value is not None:
                ids.update(value if isinstance(value, list) else [value])
                break
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        logger.warning("%s names no end-of-sequence token the tokenizer knows: outputs end only at their "
                       "token budget or a stop condition", path)  # fmt: skip
    return frozenset(ids)


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.eos_token_ids = read_eos_token_ids(config.model_path, tokenizer)
        self.max_model_len = config.scheduler.max_model_len
        tokenizer.limit_text(self.max_model_len)
        self.max_tokens_cap = config.scheduler.max_tokens_cap
        self.vocab_size = config.model.vocab_size
        # The LoRA adapters requests may name: the start-up ones, then as loads and unloads go.
        self.lora_names: tuple[str, ...] = config.lora_names
        # A tokenizer with ids past the model's vocabulary (a folder whose files disagree) could
        # index past the embedding table: only then are a text prompt's ids checked.
        self._text_ids_can_exceed_vocab = tokenizer.largest_token_id >= self.vocab_size
        if self._text_ids_can_exceed_vocab:
            logger.warning(
                "the tokenizer has token ids up to %d but the model's vocab_size is %d: prompts whose "
                "text has the others are refused",
                tokenizer.largest_token_id,
                self.vocab_size,
            )

    def tokenize_prompt(self, prompt: Prompt, add_special_tokens: bool = True) -> list[int]:
        """A text's tokens (with the special tokens its tokenizer adds, a BOS, unless
        ``add_special_tokens`` is false), or token ids checked against the vocabulary."""
        if not prompt:
            raise PromptError("prompt is empty")
        if isinstance(prompt, str):
            try:
                token_ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            except InvalidTextError as exc:
                raise PromptError(str(exc)) from None
            beyond = [t for t in token_ids if t >= self.vocab_size] if self._text_ids_can_exceed_vocab else []
            if beyond:
                raise PromptError(f"the prompt's text has tokens the model has no embedding for "
                                  f"(ids {beyond[:5]}, vocab_size {self.vocab_size})")  # fmt: skip
            return token_ids
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise PromptError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return list(prompt)

    def resolve_bad_words(self, params: SamplingParams) -> SamplingParams:
        """``params`` with its bad words as token sequences (``bad_words_token_ids``): each word as
        it would start the text and as it would follow a space (a BPE tokenizer gives a word a
        token of its own there), without duplicates. The server calls it on its event loop, so
        the engine thread never tokenizes them."""
        if not params.bad_words:
            return params
        found = {tuple(ids): None for ids in params.bad_words_token_ids}
        for word in params.bad_words:
            for text in (word.lstrip(), " " + word.lstrip()):
                try:
                    ids = self.tokenizer.encode(text, add_special_tokens=False)
                except InvalidTextError as exc:
                    raise PromptError(f"bad_words: {exc}") from None
                if ids:
                    found.setdefault(tuple(ids), None)
        return dataclasses.replace(params, bad_words=[], bad_words_token_ids=[list(ids) for ids in found])

    def resolve_max_tokens(
        self, num_prompt_tokens: int, params: SamplingParams, clamp_to_context: bool = False
    ) -> int:
        """Check the context limit and the cap; returns the output budget (what is left when unset).
        ``clamp_to_context``: a ``max_tokens`` past the context gets what is left (the offline API's,
        as vLLM's, whose requests then end with "length") instead of an error (the servers')."""
        room = self.max_model_len - num_prompt_tokens
        if params.embed:
            # A pooled prompt may fill the context: the one token such a request samples is dropped
            # before anything reads it, so it needs no place in the context or the KV cache.
            if room < 0:
                raise PromptError(f"this model's maximum context length is {self.max_model_len} tokens, "
                                  f"but the prompt has {num_prompt_tokens} tokens")  # fmt: skip
            return 1
        if room <= 0:
            raise PromptError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt has "
                f"{num_prompt_tokens} tokens, which leaves no room for the one token every request computes"
            )
        cap = self.max_tokens_cap
        if params.max_tokens is None:
            return room if cap is None else min(room, cap)
        if cap is not None and params.max_tokens > cap:
            raise PromptError(f"max_tokens is {params.max_tokens}; this server allows at most {cap}")
        if params.max_tokens > room:
            if clamp_to_context:
                return room
            raise PromptError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{num_prompt_tokens} tokens and max_tokens asks for {params.max_tokens} more "
                f"({num_prompt_tokens + params.max_tokens} in all)"
            )
        return params.max_tokens

    def check_task(self, params: SamplingParams) -> None:
        """A sequence classifier only pools prompts (``params.embed``): it has no LM head, so
        nothing that reads or shapes a vocabulary's logits applies."""
        labels = self.config.model.labels
        if not labels:
            return
        if not params.embed:
            raise PromptError(f"the model is a sequence classifier ({len(labels)} labels): it "
                              f"classifies prompts (LLM.classify, POST /classify) and does not generate "
                              f"text")  # fmt: skip
        options = {
            "logprobs": params.logprobs is not None,
            "prompt_logprobs": params.prompt_logprobs is not None,
            "logit_bias": bool(params.logit_bias),
            "allowed_token_ids": params.allowed_token_ids is not None,
            "bad_words": bool(params.bad_words or params.bad_words_token_ids),
            "structured_output": params.structured_output is not None,
            "penalties": (params.repetition_penalty, params.presence_penalty, params.frequency_penalty)
            != (1.0, 0.0, 0.0),
        }
        asked = [name for name, given in options.items() if given]
        if asked:
            raise PromptError(f"a sequence classifier's requests take no {', '.join(asked)}: they pool "
                              f"the prompt into label logits")  # fmt: skip

    def make_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        arrival_time: float | None = None,
        clamp_to_context: bool = False,
    ) -> Request:
        if params.n != 1:
            raise PromptError(
                f"n: an engine request is one sample, got n={params.n} (LLM.generate and the servers "
                "run n requests)"
            )
        if params.adapter is not None and params.adapter not in self.lora_names:
            known = ", ".join(self.lora_names) or "none"
            raise PromptError(f"no LoRA adapter {params.adapter!r} in this engine (adapters: {known})")
        if params.priority and self.config.scheduler.policy != "priority":
            raise PromptError(PRIORITY_NEEDS_POLICY.format(params.priority))
        self.check_task(params)
        out_of_range = [t for t in params.allowed_token_ids or () if t >= self.vocab_size]
        out_of_range += [t for ids in params.bad_words_token_ids for t in ids if t >= self.vocab_size]
        out_of_range += [t for t in params.logit_bias if not 0 <= t < self.vocab_size]
        if out_of_range:
            raise PromptError(f"token ids out of range [0, {self.vocab_size}): {out_of_range[:5]}")
        params = self.resolve_bad_words(params)
        token_ids = self.tokenize_prompt(prompt)
        return Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            params=params,
            eos_token_ids=self.eos_token_ids,
            max_output_tokens=self.resolve_max_tokens(len(token_ids), params, clamp_to_context),
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
        )
