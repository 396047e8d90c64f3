"""The repetition, presence and frequency penalties of a whole batch at once.

Each penalized request's tokens are kept between steps, in one of two forms with one interface:
- `HostPenalties` (on the CPU): each request's distinct tokens so far (prompt and output, for the
  repetition penalty) and its output tokens' counts (for presence and frequency), grown by its new
  tokens; a step lays every penalized row's tokens out as one index into the flattened logits and
  penalizes them with one gather and one scatter, work that follows the tokens seen, not the
  vocabulary, which is what a CPU pays for;
- `PenaltyTables` (`penalty_tables.py`, on a GPU): a row a request of two tables on the device, its
  prompt's tokens and its output's counts, whose penalized rows a step reads in a few passes over
  [rows, vocab]: the host's work follows the rows, not the tokens seen.

Either way the tokens a step draws are counted as soon as they are drawn (`count_sampled`: on the
device for the tables; on the CPU the drawn tokens are already on the host), so the next step needs
nothing the host has not read yet: penalized requests keep asynchronous scheduling (a step launched
before the last one's tokens are read). A penalized request draws one row a step (the scheduler gives
it no guesses to verify: each would need the counts of the guesses before it).

A request's state goes when the scheduler reports it finished (`Scheduler.take_finished_ids`,
through `ModelRunner.forget`). It is rebuilt from the host's tokens where it ran ahead of the token
the request samples now (a step lost after sampling and scheduled again); tokens the host knows and
the state does not (after such a rebuild, or outputs a caller set) are added at the request's next
step. A step whose penalties cannot be applied fails every penalized row of it (the batch is one
operation), and its histories go, to be rebuilt; a request that then misses a token drawn in that
step fails alone in the next, so one failure does not spread to the requests that come after it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from inferd.engine.request import Request
from inferd.growing_array import GrowingArray
from inferd.sampling_params import SamplingParams


def has_penalty(request: Request) -> bool:
    params = request.params
    return (
        params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    )


class History:
    """One request's state: whose it is, and how much of its output it holds."""

    def __init__(self, request: Request) -> None:
        self.owner = weakref.ref(request)  # an id can come back as a newer request's
        self.counted = 0  # its output positions taken in, from the host or as drawn


@dataclass
class PenalizedStep:
    """A step's penalized rows, whose tokens are counted once drawn."""

    rows: list[int] = field(default_factory=list)  # their rows of the step's logits
    histories: list[History] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # the output position each samples
    # Rows left unpenalized, each failing its request alone, with why.
    failed: dict[int, str] = field(default_factory=dict)
    # What a form put on the device for the step (the tables: its indices and penalties), read again
    # when the drawn tokens are counted.
    on_device: object | None = None


class PenaltyState:
    """The penalized requests' histories, kept between steps; the form they are kept in is a
    subclass's."""

    def __init__(self) -> None:
        self._histories: dict[str, History] = {}

    @property
    def num_requests(self) -> int:
        return len(self._histories)

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drops the histories of finished requests."""
        for request_id in request_ids:
            history = self._histories.pop(request_id, None)
            if history is not None:
                self._release(history)

    def apply(self, logits: torch.Tensor, requests: Sequence[Request]) -> PenalizedStep:
        """Penalizes, in place, the contiguous float32 ``logits`` rows ([len(requests), vocab]) of
        the requests that ask for it: repetition (HF's, over prompt and output: a seen token's
        positive logit divided by the penalty, a negative one multiplied) before presence and
        frequency (OpenAI's, over the output: ``frequency * count + presence`` subtracted). Returns
        what `count_sampled` needs to count the tokens drawn from them, and the rows that could not
        be penalized (each fails its own request).

        If it raises, the step's histories go (they may be half made) and are rebuilt from the
        host's tokens when their requests sample again; a request whose earlier step's penalties
        failed under asynchronous scheduling then misses the token that step drew, so its row
        fails alone, and the requests beside it are penalized as ever."""
        vocab = logits.shape[1]
        step = PenalizedStep()
        penalized = [i for i, request in enumerate(requests) if has_penalty(request)]
        if not penalized:
            return step
        if len({id(requests[i]) for i in penalized}) < len(penalized):
            raise ValueError("a penalized request draws one row a step")
        self._prepare(vocab, logits.device)
        in_step = {requests[i].request_id for i in penalized}
        started: list[tuple[History, Request]] = []
        known_tokens: list[tuple[History, list[int]]] = []
        try:
            for i in penalized:
                request, position = requests[i], requests[i].sampling_position
                known = request.output_token_ids
                history = self._histories.get(request.request_id)
                if history is not None and history.owner() is not request:
                    self.forget([request.request_id])  # a newer request's id: the old one's state goes
                    history = None
                # A history that ran ahead of the position sampled now (a lost step run again)
                # starts over from the host's tokens, as a new one does.
                fresh = history is None or history.counted > position
                holds = len(known) if history is None or fresh else max(history.counted, len(known))
                if holds < position:
                    step.failed[i] = (
                        f"penalties: output position {position} is sampled but only {holds} tokens are "
                        "counted (an earlier step's penalties failed)"
                    )
                    self.forget([request.request_id])
                    continue
                if fresh:
                    history = self._histories[request.request_id] = self._start(request, history, in_step)
                    started.append((history, request))
                assert history is not None
                if history.counted < len(known):
                    known_tokens.append((history, [t for t in known[history.counted :] if t < vocab]))
                    history.counted = len(known)
                step.rows.append(i)
                step.histories.append(history)
                step.positions.append(position)
            if step.rows:
                self._take(started, known_tokens, vocab, logits.device)
                self._penalize(logits, [requests[i].params for i in step.rows], step)
        except BaseException:
            self.forget(in_step)
            raise
        return step

    def count_sampled(self, step: PenalizedStep, tokens: torch.Tensor) -> None:
        """Takes in the tokens a step drew (``tokens``: one per row of its logits, on their device)
        for the requests ``step`` names, before the host reads them."""
        if not step.rows:
            return
        self._count(step, tokens)
        for history, position in zip(step.histories, step.positions, strict=True):
            history.counted = position + 1

    # What a form of keeping the histories provides.
    def _prepare(self, vocab: int, device: torch.device) -> None:
        """Called before a step's histories are looked up."""

    def _start(self, request: Request, stale: History | None, in_step: set[str]) -> History:
        """A fresh history for ``request`` (replacing ``stale``, its own, where that ran ahead)."""
        raise NotImplementedError

    def _release(self, history: History) -> None:
        """A history that goes."""

    def _take(
        self,
        started: list[tuple[History, Request]],
        known_tokens: list[tuple[History, list[int]]],
        vocab: int,
        device: torch.device,
    ) -> None:
        """Fills the ``started`` histories with their requests' prompts, then adds the output tokens
        the host knows and a history does not hold yet (each below ``vocab``)."""
        raise NotImplementedError

    def _penalize(self, logits: torch.Tensor, params: list[SamplingParams], step: PenalizedStep) -> None:
        raise NotImplementedError

    def _count(self, step: PenalizedStep, tokens: torch.Tensor) -> None:
        raise NotImplementedError


class _HostHistory(History):
    """One request's tokens as its penalties read them, on the host."""

    def __init__(self, request: Request) -> None:
        super().__init__(request)
        params = request.params
        # Distinct tokens of prompt and output, for the repetition penalty.
        self.seen: set[int] | None = set() if params.repetition_penalty != 1.0 else None
        self.seen_tokens = GrowingArray(np.int64)
        # Distinct output tokens and how often each came, for presence and frequency.
        self.position: dict[int, int] | None = None
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            self.position = {}
        self.output_tokens = GrowingArray(np.int64)
        self.output_counts = GrowingArray(np.float32)

    def see(self, tokens: np.ndarray) -> None:
        """Prompt tokens (distinct, below the vocabulary)."""
        if self.seen is not None:
            self.seen.update(tokens.tolist())
            self.seen_tokens.extend(tokens)

    def take(self, tokens: Iterable[int]) -> None:
        """Output tokens (below the vocabulary)."""
        for token in tokens:
            if self.seen is not None and token not in self.seen:
                self.seen.add(token)
                self.seen_tokens.append(token)
            if self.position is not None:
                position = self.position.get(token)
                if position is None:
                    self.position[token] = self.output_tokens.size
                    self.output_tokens.append(token)
                    self.output_counts.append(1)
                else:
                    self.output_counts.add_at(position, 1)


class HostPenalties(PenaltyState):
    """Histories on the host, penalized through one index of the seen tokens a step (the CPU's
    form: its work follows the tokens seen, not the vocabulary)."""

    def _start(self, request: Request, stale: History | None, in_step: set[str]) -> History:
        return _HostHistory(request)

    def _take(
        self,
        started: list[tuple[History, Request]],
        known_tokens: list[tuple[History, list[int]]],
        vocab: int,
        device: torch.device,
    ) -> None:
        for history, request in started:
            assert isinstance(history, _HostHistory)
            prompt = np.unique(np.asarray(request.prompt_token_ids, dtype=np.int64))
            history.see(prompt[prompt < vocab])
        for history, tokens in known_tokens:
            assert isinstance(history, _HostHistory)
            history.take(tokens)

    def _count(self, step: PenalizedStep, tokens: torch.Tensor) -> None:
        drawn = tokens.tolist()  # a host tensor here: drawn already, nothing to wait for
        for row, history in zip(step.rows, step.histories, strict=True):
            assert isinstance(history, _HostHistory)
            history.take((drawn[row],))

    def _penalize(self, logits: torch.Tensor, params: list[SamplingParams], step: PenalizedStep) -> None:
        vocab = logits.shape[1]
        repeated: list[tuple[int, np.ndarray, float]] = []
        counted: list[tuple[int, np.ndarray, np.ndarray, float, float]] = []
        for row, history, p in zip(step.rows, step.histories, params, strict=True):
            assert isinstance(history, _HostHistory)
            if history.seen is not None:
                repeated.append((row, history.seen_tokens.view(), p.repetition_penalty))
            if history.position is not None and history.output_tokens.size:
                tokens, counts = history.output_tokens.view(), history.output_counts.view()
                counted.append((row, tokens, counts, p.presence_penalty, p.frequency_penalty))
        flat = logits.view(-1)
        if repeated:
            index, lengths = _flat_index([(row, tokens) for row, tokens, _ in repeated], vocab)
            factor = np.repeat(np.array([f for _, _, f in repeated], dtype=np.float32), lengths)
            where, penalty = upload(index, logits.device), upload(factor, logits.device)
            values = flat[where]
            flat[where] = torch.where(values > 0, values / penalty, values * penalty)
        if counted:
            index, lengths = _flat_index([(row, tokens) for row, tokens, *_ in counted], vocab)
            counts = np.concatenate([c for _, _, c, _, _ in counted])
            presence = np.repeat(np.array([p for *_, p, _ in counted], dtype=np.float32), lengths)
            frequency = np.repeat(np.array([f for *_, f in counted], dtype=np.float32), lengths)
            # In float32, as the device would compute it: ``logit - (frequency * count + presence)``.
            subtracted = frequency * counts + presence
            flat.index_add_(0, upload(index, logits.device), upload(-subtracted, logits.device))


def upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` on ``device`` (integers as int64 indices); on a GPU it goes up from pinned memory
    without a host wait (the caching host allocator keeps the staging memory until the copy has
    run)."""
    tensor = torch.from_numpy(array.astype(np.int64) if array.dtype.kind in "iu" else array)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _flat_index(rows: list[tuple[int, np.ndarray]], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's tokens as positions in the flattened [rows, vocab] logits, and how many a row has."""
    lengths = np.array([len(tokens) for _, tokens in rows], dtype=np.int64)
    row_of = np.repeat(np.array([row for row, _ in rows], dtype=np.int64), lengths)
    return row_of * vocab + np.concatenate([tokens for _, tokens in rows]), lengths
