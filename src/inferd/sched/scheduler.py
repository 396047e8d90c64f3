"""Iteration-level scheduler: continuous batching, chunked prefill, prefix reuse, preemption."""

from __future__ import annotations

import bisect
import time
from collections import deque

from inferd.config import SchedulerConfig
from inferd.engine.request import FinishReason, Request, RequestStatus
from inferd.kv.manager import BlockKeys, KVCacheManager
from inferd.sample.penalties import needs_history
from inferd.sched.output import ScheduledSequence, SchedulerOutput
from inferd.sched.prefixes_in_flight import PrefixesInFlight
from inferd.sched.proposer import GuessRequest, Proposer


class Scheduler:
    """Decides, every step, which tokens of which requests run.

    Running requests come first (in admission order) so decodes keep flowing; what is left of
    the token budget admits waiting requests, whose prompts may be split over several steps.
    When the pool cannot grow a running request, the newest running request is preempted: its
    blocks are freed and it goes back to the front of the queue to be recomputed later.

    Under the priority policy the queue and the running list are kept in order of
    ``(params.priority, arrival)`` instead: the most urgent requests are admitted and scheduled
    first, and the least urgent running one is the one preempted.

    With a ``proposer`` (speculative decoding), a decoding request also runs the tokens proposed
    to follow its last one; ``update`` keeps those the model's samples agree with.
    """

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, proposer: Proposer | None = None) -> None:
        self.config = config
        self.kv = kv
        self.proposer = proposer
        # Speculative decoding: steps a request ran proposed tokens in, the tokens, those accepted.
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # Unfinished requests that score their prompt: a step without any skips looking for them.
        self._num_scoring = 0
        self._num_embedding = 0
        # Requests finished since the engine last took them (`take_finished_ids`): the runner's
        # per-request state (the penalties' token counts) goes with them.
        self._finished_ids: list[str] = []
        self._prefixes_in_flight = (
            PrefixesInFlight(kv.block_size, lambda key: kv.pool.lookup(key) is not None)
            if kv.enable_prefix_caching
            else None
        )

    # -- queue management -------------------------------------------------------------------
    def add(self, request: Request) -> None:
        # A pooled prompt may fill the context: its one sampled token is dropped unread.
        if request.num_prompt_tokens >= self.config.max_model_len + request.params.embed:
            raise ValueError(
                f"prompt has {request.num_prompt_tokens} tokens; the context limit is "
                f"{self.config.max_model_len}"
            )
        self.requests[request.request_id] = request
        self._enqueue(request, at_front=False)
        self._num_scoring += request.params.prompt_logprobs is not None
        self._num_embedding += request.params.embed

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request_id: str, reason: FinishReason) -> Request | None:
        """End a request wherever it is and free its blocks at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self._num_scoring -= request.params.prompt_logprobs is not None
        self._num_embedding -= request.params.embed
        if self._prefixes_in_flight is not None:
            self._prefixes_in_flight.forget(request_id)
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        self.kv.free(request_id)
        if self.proposer is not None:
            self.proposer.forget(request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self._finished_ids.append(request_id)
        return request

    def take_finished_ids(self) -> list[str]:
        """The requests finished since the last call."""
        finished, self._finished_ids = self._finished_ids, []
        return finished

    # -- one step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens. Computed counts advance here, not when the step's results come
        back, so the next step can be scheduled while this one still runs on the device: a request
        whose last token is still in flight decodes it from the device (``from_last_sample``)."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[str] = []

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if self._ends_with_inflight_token(request):
                index += 1  # its last token is being sampled; the results will finish it
                continue
            num_new = self._chunk(request.num_tokens_with_inflight - request.num_computed_tokens, budget)
            while not self.kv.allocate(request.request_id, request.num_computed_tokens + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                break  # it preempted itself; everything after it is gone too
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            index += 1

        if not preempted:
            budget = self._admit_waiting(budget, scheduled)
        if self.proposer is not None:
            self._add_guesses(scheduled, budget)
        return SchedulerOutput(
            scheduled, preempted, scores_prompts=self._num_scoring > 0, embeds_prompts=self._num_embedding > 0
        )

    def _add_guesses(self, scheduled: list[ScheduledSequence], budget: int) -> None:
        """Speculative decoding's guesses, last: from the token budget and the free blocks that
        every running request's next token and the admitted prompts left, so guessing never
        crowds out or preempts anyone. A proposer that guesses for a step's requests together (a
        draft model, ``batched``) is asked once, each request's room what the budget left after
        the rooms before it; prompt lookup request by request, from the budget the guesses before
        it left."""
        assert self.proposer is not None
        asked: list[tuple[ScheduledSequence, int]] = []
        for seq in scheduled:
            room = min(budget, self._guess_room(seq))
            if room <= 0:
                continue
            if self.proposer.batched:
                asked.append((seq, room))
                budget -= room
            else:
                (guesses,) = self.proposer.propose_batch([_guess_request(seq.request, room)])
                budget -= self._run_guesses(seq, guesses)
        if asked:
            proposals = self.proposer.propose_batch(
                [_guess_request(seq.request, room) for seq, room in asked]
            )
            for (seq, _room), guesses in zip(asked, proposals, strict=True):
                self._run_guesses(seq, guesses)

    def _run_guesses(self, seq: ScheduledSequence, guesses: list[int]) -> int:
        """Run ``guesses`` after the request's last token in this step, where the pool has their
        blocks; how many ran."""
        request = seq.request
        if not guesses or not self.kv.allocate(
            request.request_id, request.num_computed_tokens + len(guesses)
        ):
            return 0
        seq.token_ids += guesses
        seq.num_draft_tokens = len(guesses)
        seq.block_table = list(self.kv.block_table(request.request_id))
        request.num_computed_tokens += len(guesses)  # until update takes back the rejected
        return len(guesses)

    def _guess_room(self, seq: ScheduledSequence) -> int:
        """How many tokens a decoding request (``seq``, this step's) may guess after its last one.

        Only a request whose next samples do not depend on the ones before them in the same step
        guesses: penalties, ``min_tokens`` and grammars read the output so far, which a step of
        guesses would have to extend row by row. Guesses stop where the output or the context
        would end anyway."""
        assert self.proposer is not None
        request = seq.request
        if (
            not request.output_token_ids
            or seq.num_tokens != 1
            or seq.start_pos + 1 != request.num_tokens
            or not seq.sample
            or seq.from_last_sample
            or needs_history(request)
        ):
            return 0
        return min(
            request.max_output_tokens - len(request.output_token_ids) - 1,
            self.config.max_model_len - request.num_tokens - 1,
            request.guess_limit or self.proposer.num_tokens,
        )

    def _ends_with_inflight_token(self, request: Request) -> bool:
        """Whether the token now being sampled for ``request`` is certainly its last one."""
        if not request.num_inflight_tokens:
            return False
        num_out = len(request.output_token_ids) + request.num_inflight_tokens
        return (
            num_out >= request.max_output_tokens
            or request.num_tokens_with_inflight >= self.config.max_model_len
        )

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledSequence]) -> int:
        # Those whose prompt's next block a running request is computing: back at the head of the
        # queue, in their order, after the others had their turn. A step passes over at most
        # max_num_seqs of them, so a burst sharing one head costs each step a bounded scan.
        put_off: list[Request] = []
        in_flight = self._prefixes_in_flight
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            # A request preempted with a token in flight gets it before the next schedule.
            assert not request.num_inflight_tokens, "readmitted before its in-flight token came back"
            if in_flight is not None and in_flight.still_put_off(request.request_id):
                put_off.append(self.waiting.popleft())
                if len(put_off) >= self.config.max_num_seqs:
                    break
                continue
            # A prompt whose log-probabilities are asked for is computed whole: cached blocks
            # would skip the positions they are read from.
            scoring = request.params.prompt_logprobs is not None
            if request.block_keys is None:
                request.block_keys = BlockKeys(request.cache_salt)
            cached = (
                0
                if scoring
                else self.kv.find_cached_prefix(
                    request.request_id, request.all_token_ids, request.cache_salt, request.block_keys,
                    record=False,
                )
            )  # fmt: skip
            if not scoring and in_flight is not None and in_flight.put_off(request, cached):
                # Wait for that block to be cached rather than compute it a second time.
                self.kv.free(request.request_id)
                put_off.append(self.waiting.popleft())
                if len(put_off) >= self.config.max_num_seqs:
                    break
                continue
            request.num_computed_tokens = cached
            num_new = self._chunk(request.num_tokens - request.num_computed_tokens, budget)
            if not self.kv.allocate(request.request_id, request.num_computed_tokens + num_new):
                # Wait for running requests to free blocks; give back the prefix hits meanwhile.
                self.kv.free(request.request_id)
                request.num_computed_tokens = 0
                break
            if not scoring:  # counted once admitted, not at each step it waited for blocks
                self.kv.record_prefix_lookup(len(request.all_token_ids), cached)
            if request.num_preemptions == 0:
                request.num_cached_tokens = cached
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            if self.config.policy == "priority":
                self.running.insert(_urgency_index(self.running, request), request)
            else:
                self.running.append(request)
            if in_flight is not None:
                in_flight.claim(request, cached)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(put_off))
        return budget

    def _chunk(self, num_left: int, budget: int) -> int:
        """How many of a request's ``num_left`` uncomputed tokens this step takes: what the budget
        leaves, and no more than the long-prefill threshold where one is set."""
        threshold = self.config.long_prefill_token_threshold
        if threshold:
            return min(num_left, budget, threshold)
        return min(num_left, budget)

    def _scheduled(self, request: Request, num_new: int) -> ScheduledSequence:
        start = request.num_computed_tokens
        end = start + num_new
        sample = end == request.num_tokens_with_inflight
        # Only a decode step can reach past the known tokens: its one token is still in flight.
        from_last_sample = end > request.num_tokens
        request.num_computed_tokens = end
        if sample:
            request.num_inflight_tokens += 1
        return ScheduledSequence(
            request=request,
            token_ids=[0] if from_last_sample else request.tokens_in_range(start, end),
            start_pos=start,
            block_table=list(self.kv.block_table(request.request_id)),
            sample=sample,
            from_last_sample=from_last_sample,
        )

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        if self._prefixes_in_flight is not None:
            self._prefixes_in_flight.release(request.request_id)
        if self.proposer is not None:
            self.proposer.forget(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request, at_front=True)

    def _enqueue(self, request: Request, at_front: bool) -> None:
        """Into the queue: by urgency under the priority policy; else at the back (a new request)
        or the front (a preempted one, older than those still waiting)."""
        if self.config.policy == "priority":
            self.waiting.insert(_urgency_index(self.waiting, request), request)
        elif at_front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    # -- results ------------------------------------------------------------------------------
    def update(self, output: SchedulerOutput, sampled: dict[str, list[int]]) -> list[tuple[Request, int]]:
        """Append a step's sampled tokens, register newly filled blocks and finish requests that
        are done. Returns the requests that received tokens (finished ones included), each with
        how many: one, or with speculative decoding the proposed tokens the model accepted and one
        of its own (fewer where one ends the request).

        ``sampled``: each sampling request's tokens, one per row it sampled (a request that ran
        proposed tokens sampled after its last token and after each proposed one).

        A request preempted after the step was launched still gets its token, as it would have
        had the step's results come back before the preemption.
        """
        advanced = []
        for seq in output.sequences:
            request = seq.request
            if seq.sample:
                request.num_inflight_tokens -= 1
            if request.status == RequestStatus.FINISHED:
                continue  # aborted, or ended by an earlier token, while the step ran
            tokens = sampled.get(request.request_id)
            if tokens is not None and seq.num_draft_tokens:
                tokens = self._accepted(seq, tokens)
                if request.status == RequestStatus.RUNNING:
                    # The K/V of the rejected guesses are wrong; their slots are written again.
                    request.num_computed_tokens = seq.start_pos + len(tokens)
            reason = None
            num_out_before = len(request.output_token_ids)
            for token in tokens or ():
                request.output_token_ids.append(token)
                reason = self._stop_reason(request, token)
                if reason is not None:
                    break
            if request.status == RequestStatus.RUNNING:
                # Blocks taken only for rejected guesses go back: held, they could make another
                # request's growth preempt someone, which guessing must never do.
                if seq.num_draft_tokens and self.kv.trim(request.request_id, request.num_tokens):
                    request.num_table_trims += 1
                # Only blocks whose every token is known get a prefix-cache hash.
                self.kv.cache_computed_blocks(
                    request.request_id,
                    request.tokens_in_range,
                    min(request.num_computed_tokens, request.num_tokens),
                    request.cache_salt,
                    request.block_keys,
                )
                if (
                    self._prefixes_in_flight is not None
                    and request.num_computed_tokens >= request.num_prompt_tokens
                ):
                    self._prefixes_in_flight.release(request.request_id)  # its prompt's blocks are cached
                # A sliding-window model's blocks out of every later query's reach go back. No
                # later step (one in flight, or one launched again after a failed launch) starts
                # before the end of this step's positions that are not guesses.
                self.kv.release_out_of_window(
                    request.request_id, seq.start_pos + seq.num_tokens - seq.num_draft_tokens
                )
            if tokens is None:
                continue
            if reason is not None:
                self.finish(request.request_id, reason)
            advanced.append((request, len(request.output_token_ids) - num_out_before))
        return advanced

    def _accepted(self, seq: ScheduledSequence, samples: list[int]) -> list[int]:
        """The tokens a step of guesses gives: the guesses up to the first one the sample at its
        position disagrees with, then the sample there (or after the last guess).

        Sample i was drawn given the context and guesses before i, so while every guess before it
        matched its sample, sample i is drawn exactly as it would have been without guessing:
        the output's distribution is that of one token per step, greedy or random. (A guess is
        one token for sure, so the rejection rule of speculative sampling reduces to this match.)
        """
        guesses = seq.token_ids[-seq.num_draft_tokens :]
        accepted = 0
        for guess, sample in zip(guesses, samples, strict=False):
            if guess != sample:
                break
            accepted += 1
        self.num_drafts += 1
        self.num_draft_tokens += len(guesses)
        self.num_accepted_tokens += accepted
        assert self.proposer is not None
        # The next proposal's length follows this one's fate: one more than the run kept, or
        # twice as many after a proposal kept whole. Rows guessed in vain cost compute (a step of
        # five tokens took about a quarter longer than one of one on the CPU), and a request whose
        # guesses keep failing (sampling at a temperature) wastes fewer of them.
        seq.request.guess_limit = (
            min(2 * len(guesses), self.proposer.num_tokens) if accepted == len(guesses) else accepted + 1
        )
        return samples[: accepted + 1]

    def unschedule(self, output: SchedulerOutput) -> None:
        """Undo what ``schedule`` counted for a step that never ran (its launch or read failed)."""
        for seq in output.sequences:
            request = seq.request
            if seq.sample:
                request.num_inflight_tokens -= 1
            if request.status == RequestStatus.RUNNING:
                request.num_computed_tokens = seq.start_pos

    def _stop_reason(self, request: Request, token: int) -> FinishReason | None:
        params = request.params
        num_out = len(request.output_token_ids)
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                return FinishReason.STOP
            if token in params.stop_token_ids:
                return FinishReason.STOP
        if num_out >= request.max_output_tokens or request.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    # -- introspection ------------------------------------------------------------------------
    @property
    def num_prefix_waits(self) -> int:
        """Requests put off because a running request was computing their prompt's next block
        (each once per wait, however many steps it lasted)."""
        return self._prefixes_in_flight.num_put_off if self._prefixes_in_flight is not None else 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)


def _urgency(request: Request) -> tuple[int, float]:
    return request.params.priority, request.arrival_time


def _urgency_index(queue: deque[Request] | list[Request], request: Request) -> int:
    """Where ``request`` goes in a queue kept in order of urgency: after every request at least as
    urgent (so equals keep their arrival order)."""
    key = _urgency(request)
    return bisect.bisect_right(queue, key, key=_urgency)


def _guess_request(request: Request, room: int) -> GuessRequest:
    return GuessRequest(
        request.request_id,
        request.prompt_token_ids,
        request.output_token_ids,
        room,
        request.params.cache_salt,
    )
