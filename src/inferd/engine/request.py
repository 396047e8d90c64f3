"""A request's state inside the engine core."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from inferd.sampling_params import SamplingParams

if TYPE_CHECKING:  # the sampler imports this module
    from inferd.kv.manager import BlockKeys
    from inferd.sample.penalties import TokenBans
    from inferd.sample.sampler import TokenLogprobs
    from inferd.structured.matcher import RequestGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class RequestFault(str):
    """An error message whose cause is the request itself, not the engine: its limits together
    leave no token to sample, or its structured output's grammar cannot run. The servers answer
    it as a bad request (400) rather than a failure of theirs (500)."""


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # the client left or the server aborted it
    TIMEOUT = "timeout"
    ERROR = "error"


# Compared by identity: the generated __eq__ compared field by field, and the scheduler's list
# removals (a finish, a preemption) compare a request with the running ones.
@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    max_output_tokens: int  # params.max_tokens resolved against the context limit
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first scheduling
    num_preemptions: int = 0
    # Tokens sampled on the device whose ids the host has not read yet: with asynchronous
    # scheduling the next step is scheduled (and runs) before the last one's tokens come back.
    num_inflight_tokens: int = 0
    first_scheduled_time: float | None = None
    finish_reason: FinishReason | None = None
    # The sampler's private generator for a seeded request, made on first use on its device and
    # seeded again for each output position it draws.
    generator: torch.Generator | None = None
    # With params.prompt_logprobs: entry p is prompt token p's, given the ones before it (the
    # first token has none), filled in as the prompt's chunks are computed.
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    # With params.structured_output: where the output is in its grammar (set by the engine core).
    grammar: RequestGrammar | None = None
    # Speculative decoding: the most tokens it may guess next (0: the configured number), and how
    # often its block table gave back blocks of rejected guesses (a table otherwise only grows).
    guess_limit: int = 0
    num_table_trims: int = 0
    # What its prefix-cache hashes start from (set by the engine core): its LoRA adapter's load,
    # whose K/V are its own, or None for the base model.
    cache_salt: str | None = None
    # Its allowed tokens and bad words as the sampler lays them out, made on first use.
    token_bans: TokenBans | None = None
    # Its prefix-cache keys of full blocks, hashed once for all its lookups (made on the first).
    block_keys: BlockKeys | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_inflight(self) -> int:
        """Known tokens plus those sampled on the device and not read yet."""
        return self.num_tokens + self.num_inflight_tokens

    @property
    def sampling_position(self) -> int:
        """The output index of the token sampled for it now: its tokens known, plus those sampled
        on the device before this one and not read yet (the one being sampled counts among the
        in-flight tokens from its scheduling on)."""
        return len(self.output_token_ids) + max(self.num_inflight_tokens - 1, 0)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def tokens_in_range(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]
