"""What speculative decoding's proposers give the scheduler: guesses of each request's next
tokens, for all of a step's guessing requests at once, and the end of a request's state."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

from inferd.config import EngineConfig


@dataclass
class GuessRequest:
    """One request a step asks guesses for: its prompt and its output so far, the request's own
    lists (read only), so that asking costs nothing however long they are."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    room: int  # at most so many guesses
    # Its own `cache_salt`: a draft model's cached blocks are shared only under the same one (not
    # the adapter's part: a draft's K/V do not depend on the served model's adapter).
    cache_salt: str | None = None

    @cached_property
    def tokens(self) -> list[int]:
        """Its tokens so far, prompt then output (made once, on first reading)."""
        return self.prompt_token_ids + self.output_token_ids


class Proposer(Protocol):
    # The most tokens one request guesses in a step.
    num_tokens: int
    # Whether it guesses for a step's requests together (a model's batch), or one by one.
    batched: bool

    def propose_batch(self, requests: list[GuessRequest]) -> list[list[int]]:
        """Guesses for each request, in order."""
        ...

    def forget(self, request_id: str) -> None:
        """The request finished or was preempted: any state kept for it goes."""
        ...

    def cache_usage(self) -> float | None:
        """Share of its own KV cache's blocks in use (a draft model's); None: it keeps none."""
        ...

    def reset_prefix_cache(self) -> None:
        """Forget its own cache's prefixes (a draft model's), as the served model's are forgotten."""
        ...


def make_proposer(config: EngineConfig, num_blocks: int) -> Proposer | None:
    """The engine's proposer (None without speculative decoding); a draft model's cache holds
    ``num_blocks`` blocks, as the served model's does."""
    if config.speculative is None:
        return None
    if config.speculative.method == "draft_model":
        from inferd.sched.draft_proposer import DraftModelProposer

        return DraftModelProposer(config, num_blocks)
    from inferd.sched.ngram_proposer import NgramProposer

    return NgramProposer(config.speculative)
