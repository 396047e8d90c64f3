"""SchedulerOutput: the one contract between the scheduler and the model runner."""

from __future__ import annotations

from dataclasses import dataclass

from inferd.engine.request import Request


# Not frozen: one is made per sequence per step, and a frozen dataclass's __init__ costs 3x.
@dataclass(slots=True)
class ScheduledSequence:
    request: Request  # read by the runner for sampling state only; the scheduler owns it
    token_ids: list[int]  # the tokens to run this step ([0] as a stand-in when from_last_sample)
    start_pos: int  # position of token_ids[0] (== tokens already in the KV cache)
    block_table: list[int]
    sample: bool  # True when this chunk reaches the end of the known tokens
    # The one token to run is the one this request sampled in the step before, still on the
    # device (asynchronous scheduling): the runner feeds it from there.
    from_last_sample: bool = False
    # Speculative decoding: the last this-many of token_ids are guesses of what follows the
    # request's last token; the step samples after each of them as well as after that token.
    num_draft_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    sequences: list[ScheduledSequence]
    preempted_ids: list[str]
    # Some unfinished request scores its prompt (SamplingParams.prompt_logprobs): the runner looks
    # for prompt tokens to score only then.
    scores_prompts: bool = False
    # Likewise, some unfinished request embeds its prompt (SamplingParams.embed).
    embeds_prompts: bool = False

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not self.sequences
