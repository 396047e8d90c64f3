"""The penalties' histories as two tables on the device (`penalty_state.py` says when each form is
used): a row a penalized request, holding which tokens its prompt has (for the repetition penalty)
and how often each token came in its output (for all three). A step reads its penalized rows in a
few passes over [rows, vocab], whatever their histories' lengths, and counts the tokens it draws on
the device: the host uploads a few numbers a row and never waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from inferd.engine.request import Request
from inferd.sample.penalty_state import History, PenalizedStep, PenaltyState, upload
from inferd.sampling_params import SamplingParams

# Rows the tables hold at first; they double when full.
_FIRST_ROWS = 8
# The SamplingParams of the three penalties, in the order they go up to the device.
_PENALTIES = ("repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclass
class _StepOnDevice:
    """A step's indices and penalties, uploaded once (two copies): the penalties read them, and the
    count of the drawn tokens reads the indices again."""

    rows: torch.Tensor  # the penalized rows of the step's logits
    table_rows: torch.Tensor  # their rows of the tables
    penalties: torch.Tensor  # [3, rows] float32, in _PENALTIES' order


class _TableHistory(History):
    def __init__(self, request: Request, row: int) -> None:
        super().__init__(request)
        self.row = row  # its row of the tables


class PenaltyTables(PenaltyState):
    def __init__(self, row_limit: int | None = None, fused: bool = False) -> None:
        """``row_limit``: past this many rows, the tables make room by letting go of requests that
        neither sample in the step nor have a token in flight (preempted or waiting ones, rebuilt
        from the host's tokens when they come back) before they grow; None: they only grow.
        ``fused``: the penalties are applied by one Triton pass (``triton_penalties.py``) rather
        than torch's elementwise passes."""
        super().__init__()
        self._row_limit = row_limit
        self._fused = fused
        self._free: list[int] = []
        self._counts: torch.Tensor | None = None  # [rows, vocab] int32: output tokens' counts
        self._in_prompt: torch.Tensor | None = None  # [rows, vocab] bool: the prompt's tokens

    @property
    def num_rows(self) -> int:
        """Rows the tables hold, used or not."""
        return 0 if self._counts is None else self._counts.shape[0]

    def _prepare(self, vocab: int, device: torch.device) -> None:
        if self._counts is None:
            self._counts = torch.zeros((0, vocab), dtype=torch.int32, device=device)
            self._in_prompt = torch.zeros((0, vocab), dtype=torch.bool, device=device)
        elif self._counts.shape[1] != vocab or self._counts.device != device:
            raise ValueError(
                f"penalty counts were kept for a vocabulary of {self._counts.shape[1]} on "
                f"{self._counts.device}, not {vocab} on {device}"
            )

    def _start(self, request: Request, stale: History | None, in_step: set[str]) -> History:
        if isinstance(stale, _TableHistory):
            return _TableHistory(request, stale.row)  # its own row, emptied by _take
        if not self._free and self._row_limit is not None and self.num_rows >= self._row_limit:
            self._let_go_of_idle(in_step)
        if not self._free:
            self._grow()
        return _TableHistory(request, self._free.pop())

    def _release(self, history: History) -> None:
        assert isinstance(history, _TableHistory)
        self._free.append(history.row)

    def _let_go_of_idle(self, in_step: set[str]) -> None:
        """Frees the rows of requests that do not sample in this step and have no token in flight:
        their counts can be rebuilt from the host's tokens when they sample again."""
        for request_id, history in list(self._histories.items()):
            owner = history.owner()
            if owner is None or (request_id not in in_step and not owner.num_inflight_tokens):
                del self._histories[request_id]
                self._release(history)

    def _grow(self) -> None:
        assert self._counts is not None and self._in_prompt is not None
        old = self.num_rows
        new = max(_FIRST_ROWS, 2 * old)
        counts = self._counts.new_zeros((new, self._counts.shape[1]))
        in_prompt = self._in_prompt.new_zeros((new, self._in_prompt.shape[1]))
        counts[:old] = self._counts
        in_prompt[:old] = self._in_prompt
        self._counts, self._in_prompt = counts, in_prompt
        self._free.extend(range(new - 1, old - 1, -1))  # the lowest rows first

    def _take(
        self,
        started: list[tuple[History, Request]],
        known_tokens: list[tuple[History, list[int]]],
        vocab: int,
        device: torch.device,
    ) -> None:
        assert self._counts is not None and self._in_prompt is not None
        if started:
            rows = upload(np.array([_row(history) for history, _ in started]), device)
            self._counts.index_fill_(0, rows, 0)
            self._in_prompt.index_fill_(0, rows, False)
            repeated = [
                (_row(h), r.prompt_token_ids) for h, r in started if r.params.repetition_penalty != 1.0
            ]
            if repeated:
                prompt_rows = np.repeat([row for row, _ in repeated], [len(tokens) for _, tokens in repeated])
                prompt = np.concatenate([np.asarray(tokens, dtype=np.int64) for _, tokens in repeated])
                kept = prompt < vocab
                where = (upload(prompt_rows[kept], device), upload(prompt[kept], device))
                self._in_prompt.index_put_(where, torch.ones((), dtype=torch.bool, device=device))
        if known_tokens:
            rows_of = np.repeat(
                [_row(history) for history, _ in known_tokens], [len(t) for _, t in known_tokens]
            )
            tokens = np.concatenate([np.asarray(t, dtype=np.int64) for _, t in known_tokens])
            one = torch.ones((), dtype=torch.int32, device=device)
            self._counts.index_put_((upload(rows_of, device), upload(tokens, device)), one, accumulate=True)

    def _count(self, step: PenalizedStep, tokens: torch.Tensor) -> None:
        assert self._counts is not None and isinstance(step.on_device, _StepOnDevice)
        drawn = tokens if len(step.rows) == tokens.shape[0] else tokens[step.on_device.rows]
        one = torch.ones((), dtype=torch.int32, device=tokens.device)
        self._counts.index_put_((step.on_device.table_rows, drawn), one, accumulate=True)

    def _penalize(self, logits: torch.Tensor, params: list[SamplingParams], step: PenalizedStep) -> None:
        assert self._counts is not None and self._in_prompt is not None
        device = logits.device
        indices = upload(np.array([step.rows, [_row(history) for history in step.histories]]), device)
        values = np.array([[getattr(p, name) for p in params] for name in _PENALTIES], dtype=np.float32)
        uploaded = step.on_device = _StepOnDevice(indices[0], indices[1], upload(values, device))
        repetition, presence, frequency = uploaded.penalties
        if self._fused:
            from inferd.sample import triton_penalties

            tables = (uploaded.table_rows, self._counts, self._in_prompt)
            triton_penalties.penalize(logits, uploaded.rows, *tables, repetition, presence, frequency)
            return
        every_row = len(step.rows) == logits.shape[0]  # all rows, in order: no gather, no scatter
        index = None if every_row else uploaded.rows
        picked = logits if index is None else logits.index_select(0, index)
        counts = self._counts.index_select(0, uploaded.table_rows)
        in_output = counts > 0
        if any(p.repetition_penalty != 1.0 for p in params):
            # A row whose penalty is 1 divides and multiplies by 1: unchanged, to the bit.
            penalty = repetition.unsqueeze(1)
            seen = self._in_prompt.index_select(0, uploaded.table_rows).logical_or_(in_output)
            picked = torch.where(seen, torch.where(picked > 0, picked / penalty, picked * penalty), picked)
        if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
            # In float32, as the penalties' definition reads: ``logit - (frequency * count + presence)``
            # where the output holds the token; elsewhere +0 is subtracted, which leaves any logit,
            # -0 among them, unchanged to the bit (as the host's histories, which skip it).
            subtracted = frequency.unsqueeze(1) * counts + presence.unsqueeze(1)
            picked = picked - torch.where(in_output, subtracted, 0.0)
        if picked is logits:
            return
        if index is None:
            logits.copy_(picked)
        else:
            logits.index_copy_(0, index, picked)


def _row(history: History) -> int:
    assert isinstance(history, _TableHistory)
    return history.row
