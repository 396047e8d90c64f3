"""Turns engine-core token outputs into text outputs: detokenization, stop strings, streaming deltas."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from inferd.engine.detokenizer import IncrementalDetokenizer, find_stop
from inferd.engine.outputs import (
    EngineCoreOutput,
    Prefix,
    RequestMetrics,
    RequestOutput,
    TextPrefix,
    defer_cumulative,
)
from inferd.engine.tokenizer import Tokenizer
from inferd.sample.sampler import TokenLogprobs
from inferd.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class ProcessedOutputs(NamedTuple):
    outputs: list[RequestOutput]  # to deliver
    stopped: list[str]  # hit a stop string: the core must end them (STOP)
    failed: list[str]  # their processing raised: the core must end them (ERROR)


@dataclass
class _RequestState:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    metrics: RequestMetrics
    # token_ids, logprobs and pieces only grow (append) while the request lives: the outputs of
    # earlier steps view their first items (Prefix, TextPrefix) instead of copying them each step.
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    embedding: list[float] | None = None
    # The text, as the detokenizer's deltas: appending to a str copies it all (O(length) a step).
    # A change other than an append (a stop-string cut, the final decode) makes a new list.
    pieces: list[str] = field(default_factory=list)
    text_len: int = 0
    sent_chars: int = 0  # how much of the text has been reported as new_text
    sent_tokens: int = 0
    sent_logprobs: int = 0
    stopped_by_string: bool = False
    # The core ended the request on an EOS or stop token id, whose text stays out of the output.
    stop_token_dropped: bool = False
    # vLLM's stop_reason: the stop string matched, or the stop token id that ended the request
    # (None for an EOS token, or an end of another kind).
    stop_reason: str | int | None = None
    # Only the final output is wanted and no stop string needs the text on the way: the text is
    # decoded once at the end and nothing is emitted before (the offline API's requests).
    final_only: bool = False


class OutputProcessor:
    """Frontend-side state of every live request."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: frozenset[int] = frozenset()) -> None:
        """``eos_token_ids``: those the core ends requests on (all but the tokenizer's own EOS
        report their id as stop_reason, as vLLM's)."""
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self._states: dict[str, _RequestState] = {}

    def add(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        final_only: bool = False,
    ) -> None:
        """``final_only``: the caller reads only the finished output (no deltas, no partial text)."""
        detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
        self._states[request_id] = _RequestState(
            request_id, prompt_token_ids, params, detok, RequestMetrics(arrival_time),
            final_only=final_only and not params.stop,
        )  # fmt: skip

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def __len__(self) -> int:
        return len(self._states)

    def process(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        """Detokenize and check stop strings; a request whose processing raises fails alone."""
        now = time.monotonic()
        result = ProcessedOutputs([], [], [])
        for core_out in outputs:
            state = self._states.get(core_out.request_id)
            if state is None:
                continue  # already finished here (stop string) while the core produced more
            try:
                out = self._process_one(state, core_out, now, result.stopped)
                if out is not None:
                    result.outputs.append(out)
            except Exception as exc:
                logger.exception("output processing failed for request %s", state.request_id)
                self._states.pop(state.request_id, None)
                result.failed.append(state.request_id)
                result.outputs.append(_failed_output(state, f"output processing failed: {exc!r}", now))
        return result

    def _process_one(
        self, state: _RequestState, core_out: EngineCoreOutput, now: float, stopped: list[str]
    ) -> RequestOutput | None:
        finish_reason = core_out.finish_reason
        if core_out.new_token_id is not None:
            # A token that ends the request in the core (EOS, a stop token id) adds no text unless
            # the caller asked for stop text, as a stop string's own text does not (as in vLLM).
            state.stop_token_dropped = (finish_reason == "stop" and not core_out.structure_complete
                                        and not state.params.include_stop_str_in_output)  # fmt: skip
            if finish_reason == "stop" and not core_out.structure_complete:
                state.stop_reason = self._stop_token(state.params, core_out.new_token_id)
            new_chars = self._add_token(state, core_out, now)
            # A stop string completed by the last token the budget allows still makes it a stop, and
            # one in the token that completed a structured output is cut there too.
            looks_for_stops = finish_reason in (None, "length") or core_out.structure_complete
            if looks_for_stops and self._hit_stop_string(state, new_chars):
                if finish_reason is None:
                    stopped.append(state.request_id)
                finish_reason = "stop"
        if state.final_only and finish_reason is None and core_out.error is None:
            return None
        out = self._emit(state, finish_reason, now)
        out.error = core_out.error
        out.client_fault = core_out.client_fault
        return out

    def finish(self, request_id: str, reason: str, error: str | None = None) -> RequestOutput | None:
        """Close a request from outside the core's outputs (abort, timeout, error)."""
        state = self._states.get(request_id)
        if state is None:
            return None
        out = self._emit(state, reason, time.monotonic())
        out.error = error
        return out

    def _add_token(self, state: _RequestState, core_out: EngineCoreOutput, now: float) -> int:
        """Records the token; returns how many characters of text it completed."""
        assert core_out.new_token_id is not None
        if state.metrics.first_token_time is None:
            state.metrics.first_token_time = now
            state.metrics.first_scheduled_time = core_out.first_scheduled_time
            state.metrics.num_cached_tokens = core_out.num_cached_tokens
        state.token_ids.append(core_out.new_token_id)
        if core_out.logprobs is not None:
            state.logprobs.append(core_out.logprobs)
        if core_out.prompt_logprobs is not None:
            state.prompt_logprobs = core_out.prompt_logprobs
        if core_out.embedding is not None:
            state.embedding = core_out.embedding
        if state.final_only or state.stop_token_dropped:
            return 0
        delta = state.detokenizer.add(core_out.new_token_id)
        _append_text(state, delta)
        return len(delta)

    def _hit_stop_string(self, state: _RequestState, new_chars: int) -> bool:
        """Whether a stop string ends in the `new_chars` the last token added (cutting the text there).

        As stop token ids, stop strings count only after `min_tokens` tokens (as in vLLM). A match
        starts at most a stop's length before the new text, inside what `_emit` held back, so text
        already sent is never cut."""
        stops = state.params.stop
        if not stops or len(state.token_ids) <= state.params.min_tokens:
            return False
        # find_stop reads at most a stop's length - 1 characters before the new ones.
        tail = _text_tail(state, new_chars + state.params.max_stop_len - 1)
        match = find_stop(tail, new_chars, stops)
        if match is None:
            return False
        index, matched = match
        index += state.text_len - len(tail)
        text = "".join(state.pieces)
        if state.params.include_stop_str_in_output:
            _set_text(state, text[: index + len(matched)])
        else:
            _set_text(state, text[:index])
        state.stopped_by_string = True
        state.stop_reason = matched
        return True

    def _stop_token(self, params: SamplingParams, token: int) -> int | None:
        """The token that ended a request, as vLLM's stop_reason: None for the tokenizer's EOS
        token; the id of a stop token asked for, or of another EOS id (generation_config.json's,
        such as Llama 3's <|eot_id|>, which vLLM counts among the stop token ids)."""
        if token == self.tokenizer.eos_token_id and not params.ignore_eos:
            return None
        return token if token in params.stop_token_ids or token in self.eos_token_ids else None

    def _emit(self, state: _RequestState, finish_reason: str | None, now: float) -> RequestOutput:
        finished = finish_reason is not None
        if finished:
            if state.final_only:
                with_text = state.token_ids[:-1] if state.stop_token_dropped else state.token_ids
                _set_text(state, state.detokenizer.decode_all(with_text))
            elif not state.stopped_by_string:
                _append_text(state, state.detokenizer.flush())
            state.metrics.finished_time = now
            del self._states[state.request_id]
            sendable = state.text_len
        elif state.params.include_stop_str_in_output:
            # Text is cut only after a stop string, so nothing sent can have to be retracted.
            sendable = state.text_len
        else:
            # Hold back a possible stop-string prefix, so streamed text never has to be retracted.
            sendable = max(state.text_len - max(state.params.max_stop_len - 1, 0), state.sent_chars)
        # What is unsent is short while streaming (the last delta and what was held back).
        new_text = _text_tail(state, state.text_len - state.sent_chars)[: sendable - state.sent_chars]
        state.sent_chars = sendable
        new_tokens = state.token_ids[state.sent_tokens :]
        state.sent_tokens = len(state.token_ids)
        new_logprobs = state.logprobs[state.sent_logprobs :]
        state.sent_logprobs = len(state.logprobs)
        out = RequestOutput(
            request_id=state.request_id,
            prompt_token_ids=state.prompt_token_ids,
            # The last output owns the request's lists (nothing appends to them any more); one
            # before it views this step's part of them.
            text="".join(state.pieces) if finished else "",
            token_ids=state.token_ids if finished else Prefix(state.token_ids, state.sent_tokens),
            new_text=new_text,
            new_token_ids=new_tokens,
            finished=finished,
            finish_reason=finish_reason,
            metrics=state.metrics,
            logprobs=state.logprobs,
            new_logprobs=new_logprobs,
            prompt_logprobs=state.prompt_logprobs,
            embedding=state.embedding,
            stop_reason=state.stop_reason if finish_reason == "stop" else None,
        )
        if not finished:
            text = TextPrefix(state.pieces, len(state.pieces), sendable)
            # No view where there are no logprobs (most requests): one object fewer for the GC.
            logprobs = Prefix(state.logprobs, state.sent_logprobs) if state.sent_logprobs else ()
            defer_cumulative(out, text, logprobs)
        return out


def _failed_output(state: _RequestState, message: str, now: float) -> RequestOutput:
    """The last output of a request whose processing failed: what was sent stands, plus the error."""
    state.metrics.finished_time = now
    return RequestOutput(
        request_id=state.request_id,
        prompt_token_ids=state.prompt_token_ids,
        text=str(TextPrefix(state.pieces, len(state.pieces), state.sent_chars)),
        token_ids=state.token_ids[: state.sent_tokens],
        new_text="",
        new_token_ids=[],
        finished=True,
        finish_reason="error",
        metrics=state.metrics,
        error=message,
    )


def _append_text(state: _RequestState, delta: str) -> None:
    if delta:
        state.pieces.append(delta)
        state.text_len += len(delta)


def _set_text(state: _RequestState, text: str) -> None:
    """Replaces the text: in a new list, as earlier outputs may view the old one."""
    state.pieces = [text] if text else []
    state.text_len = len(text)


def _text_tail(state: _RequestState, count: int) -> str:
    """The text's last ``count`` characters (all of it if shorter), from the pieces they are in."""
    if count <= 0:
        return ""
    taken: list[str] = []
    have = 0
    for piece in reversed(state.pieces):
        taken.append(piece)
        have += len(piece)
        if have >= count:
            break
    taken.reverse()
    return "".join(taken)[-count:]
