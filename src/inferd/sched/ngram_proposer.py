"""Prompt-lookup (n-gram) proposals for speculative decoding.

A request's next tokens are guessed from its own history: when its last ``n`` tokens appeared
earlier in its prompt or output, the tokens that followed them there are proposed. The guess costs
no model at all and is often right where outputs copy their input (quoting, editing code,
extracting fields) or repeat themselves; the model checks every guess, so a wrong one costs only
the rows it adds to the step.
"""

from __future__ import annotations

import numpy as np

from inferd.config import SpeculativeConfig
from inferd.growing_array import GrowingArray
from inferd.sched.proposer import GuessRequest


class NgramProposer:
    batched = False  # each request's guesses cost only its own lookup

    def __init__(self, config: SpeculativeConfig) -> None:
        assert config.prompt_lookup_min is not None  # resolved by SpeculativeConfig
        self.num_tokens = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        # Each request's tokens as an array (with room to grow) and how many it holds: a step adds
        # the new ones only. Made afresh from the whole history each step, the array cost O(length)
        # a request a step (schedule time went 2.9 -> 19.9 ms a step from 100 to 2,000 tokens at
        # 256 requests in a host-overhead audit).
        self._histories: dict[str, GrowingArray] = {}

    def propose_batch(self, requests: list[GuessRequest]) -> list[list[int]]:
        """``propose`` for each request, over its history kept here."""
        found: list[list[int]] = []
        for request in requests:
            limit = min(self.num_tokens, request.room)
            tokens = self._history(request)
            if limit <= 0 or len(tokens) <= self.min_n:
                found.append([])
            else:
                found.append(find_continuation(tokens, self.min_n, self.max_n, limit))
        return found

    def _history(self, request: GuessRequest) -> np.ndarray:
        """The request's tokens so far, as the array kept for it, grown by what came since."""
        prompt, output = request.prompt_token_ids, request.output_token_ids
        history = self._histories.get(request.request_id)
        if history is None or history.size > len(prompt) + len(output):
            # New, or not this history (tokens are only ever added): made again.
            history = self._histories[request.request_id] = GrowingArray(np.int64)
        if history.size < len(prompt):
            history.extend(prompt[history.size :])
        history.extend(output[history.size - len(prompt) :])
        return history.view()

    def forget(self, request_id: str) -> None:
        """A finished (or preempted) request's history goes."""
        self._histories.pop(request_id, None)

    def cache_usage(self) -> float | None:
        return None  # no model, no cache

    def reset_prefix_cache(self) -> None:
        """No cache to forget."""

    def propose(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Up to ``min(num_speculative_tokens, max_tokens)`` tokens to follow ``token_ids``; empty
        when no suffix of ``min_n`` tokens or more occurred before."""
        limit = min(self.num_tokens, max_tokens)
        if limit <= 0 or len(token_ids) <= self.min_n:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        return find_continuation(tokens, self.min_n, self.max_n, limit)


def find_continuation(tokens: np.ndarray, min_n: int, max_n: int, limit: int) -> list[int]:
    """The ``limit`` tokens after the most recent earlier occurrence of the longest suffix of
    ``tokens`` (``max_n`` tokens at most, ``min_n`` at least); none when there is no such
    occurrence. Where the continuation runs past the end of ``tokens`` it goes on with the
    proposed tokens themselves, as the match says the text repeats every ``last - end`` tokens:
    a run of one token proposes more of it, not just one.

    Every earlier position holding the last token is a candidate end of a match; the candidates
    are then extended backwards one token at a time, all at once, so a step costs a few passes
    over the positions that hold the last token, not over every n-gram of the history.
    """
    last = len(tokens) - 1
    ends = np.flatnonzero(tokens[:last] == tokens[last])
    if ends.size == 0:
        return []
    lengths = np.ones(ends.size, dtype=np.int64)
    growing = np.ones(ends.size, dtype=bool)
    for back in range(1, min(max_n, last)):
        reachable = ends >= back
        same = np.zeros(ends.size, dtype=bool)
        same[reachable] = tokens[ends[reachable] - back] == tokens[last - back]
        growing &= same
        if not growing.any():
            break
        lengths += growing
    longest = int(lengths.max())
    if longest < min_n:
        return []
    end = int(ends[np.flatnonzero(lengths == longest)[-1]])  # the most recent of the longest
    follow = tokens[end + 1 : end + 1 + limit]
    if len(follow) < limit:  # it reached the end: it is the period's tokens, which repeat
        follow = np.resize(follow, limit)
    return follow.tolist()
