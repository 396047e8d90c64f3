"""The repetition, presence and frequency penalties of a whole batch at once.

Each penalized request keeps, on the host and between steps, its distinct tokens so far (prompt
and output, for the repetition penalty) and its output tokens' counts (for presence and
frequency), each grown by the tokens it gained since its last step (one, as a rule), so its
history is never read again. A step lays every penalized row's tokens out as one index into the
flattened logits, sends it to the device (from pinned memory, without a host wait), and penalizes
them with one gather and one scatter: the work follows the tokens seen, not the vocabulary, and
the kernels do not multiply with the rows. A request's state goes when the scheduler reports it
finished (`Scheduler.take_finished_ids`, through `ModelRunner.forget`). One penalty that cannot be
applied fails every penalized row of its step (the batch is one operation).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from inferd.engine.request import Request
from inferd.growing_array import GrowingArray


def has_penalty(request: Request) -> bool:
    params = request.params
    return (
        params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    )


class _History:
    """One request's tokens as its penalties read them."""

    def __init__(self, request: Request, vocab: int) -> None:
        params = request.params
        self.owner = weakref.ref(request)  # an id can come back as a newer request's
        self.counted = 0  # output tokens taken in
        # Distinct tokens of prompt and output, for the repetition penalty.
        self.seen: set[int] | None = None
        self.seen_tokens = GrowingArray(np.int64)
        if params.repetition_penalty != 1.0:
            prompt = np.unique(np.asarray(request.prompt_token_ids, dtype=np.int64))
            prompt = prompt[prompt < vocab]
            self.seen = set(prompt.tolist())
            self.seen_tokens.extend(prompt)
        # Distinct output tokens and how often each came, for presence and frequency.
        self.position: dict[int, int] | None = None
        self.output_tokens = GrowingArray(np.int64)
        self.output_counts = GrowingArray(np.float32)
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            self.position = {}

    def take(self, outputs: Sequence[int], vocab: int) -> None:
        for token in outputs[self.counted :]:
            if token >= vocab:
                continue
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
        self.counted = len(outputs)


class PenaltyState:
    """The penalized requests' histories, kept between steps."""

    def __init__(self) -> None:
        self._histories: dict[str, _History] = {}

    @property
    def num_requests(self) -> int:
        return len(self._histories)

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drops the histories of finished requests."""
        for request_id in request_ids:
            self._histories.pop(request_id, None)

    def apply(self, logits: torch.Tensor, requests: Sequence[Request]) -> None:
        """Penalizes, in place, the contiguous float32 ``logits`` rows ([len(requests), vocab]) of
        the requests that ask for it: repetition (HF's, over prompt and output: a seen token's
        positive logit divided by the penalty, a negative one multiplied) before presence and
        frequency (OpenAI's, over the output: ``frequency * count + presence`` subtracted)."""
        vocab = logits.shape[1]
        repeated: list[tuple[int, np.ndarray, float]] = []
        counted: list[tuple[int, np.ndarray, np.ndarray, float, float]] = []
        for row, request in enumerate(requests):
            if not has_penalty(request):
                continue
            history = self._history(request, vocab)
            params = request.params
            if history.seen is not None:
                repeated.append((row, history.seen_tokens.view(), params.repetition_penalty))
            if history.position is not None and history.output_tokens.size:
                tokens, counts = history.output_tokens.view(), history.output_counts.view()
                counted.append((row, tokens, counts, params.presence_penalty, params.frequency_penalty))
        flat = logits.view(-1)
        if repeated:
            index, lengths = _flat_index([(row, tokens) for row, tokens, _ in repeated], vocab)
            factor = np.repeat(np.array([f for _, _, f in repeated], dtype=np.float32), lengths)
            where, penalty = _upload(index, logits.device), _upload(factor, logits.device)
            values = flat[where]
            flat[where] = torch.where(values > 0, values / penalty, values * penalty)
        if counted:
            index, lengths = _flat_index([(row, tokens) for row, tokens, *_ in counted], vocab)
            counts = np.concatenate([c for _, _, c, _, _ in counted])
            presence = np.repeat(np.array([p for *_, p, _ in counted], dtype=np.float32), lengths)
            frequency = np.repeat(np.array([f for *_, f in counted], dtype=np.float32), lengths)
            # In float32, as the device would compute it: ``logit - (frequency * count + presence)``.
            subtracted = frequency * counts + presence
            flat.index_add_(0, _upload(index, logits.device), _upload(-subtracted, logits.device))

    def _history(self, request: Request, vocab: int) -> _History:
        history = self._histories.get(request.request_id)
        outputs = request.output_token_ids
        if history is None or history.owner() is not request or history.counted > len(outputs):
            history = self._histories[request.request_id] = _History(request, vocab)
        history.take(outputs, vocab)
        return history


def _upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` on ``device``; on a GPU it goes up from pinned memory without a host wait (the
    caching host allocator keeps the staging memory until the copy has run)."""
    tensor = torch.from_numpy(array)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _flat_index(rows: list[tuple[int, np.ndarray]], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's tokens as positions in the flattened [rows, vocab] logits, and how many a row has."""
    lengths = np.array([len(tokens) for _, tokens in rows], dtype=np.int64)
    row_of = np.repeat(np.array([row for row, _ in rows], dtype=np.int64), lengths)
    return row_of * vocab + np.concatenate([tokens for _, tokens in rows]), lengths
