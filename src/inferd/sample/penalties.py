"""Logit processors applied per request before sampling (the penalties: `penalty_state.py`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inferd.engine.request import Request
from inferd.sample.penalty_state import has_penalty


def apply_logit_bias(logits: torch.Tensor, request: Request) -> None:
    for token_id, bias in request.params.logit_bias.items():
        if 0 <= token_id < logits.shape[0]:
            logits[token_id] += bias


@dataclass(frozen=True)
class TokenBans:
    """A request's ``allowed_token_ids`` and bad words, laid out once for every step's use."""

    outside_allowed: torch.Tensor | None  # [vocab] bool: the tokens allowed_token_ids leaves out
    always: torch.Tensor | None  # one-token bad words
    # Several-token bad words: their leading tokens -> the last tokens banned right after them.
    after: dict[tuple[int, ...], list[int]]
    lead_lengths: tuple[int, ...]

    @classmethod
    def of(cls, request: Request, vocab: int, device: torch.device) -> TokenBans:
        params = request.params
        outside = None
        if params.allowed_token_ids is not None:
            outside = torch.ones(vocab, dtype=torch.bool, device=device)
            outside[torch.tensor([t for t in params.allowed_token_ids if t < vocab], dtype=torch.long,
                                 device=device)] = False  # fmt: skip
        single = sorted({ids[0] for ids in params.bad_words_token_ids if len(ids) == 1 and ids[0] < vocab})
        after: dict[tuple[int, ...], list[int]] = {}
        for ids in params.bad_words_token_ids:
            if len(ids) > 1 and ids[-1] < vocab:
                after.setdefault(tuple(ids[:-1]), []).append(ids[-1])
        always = torch.tensor(single, dtype=torch.long, device=device) if single else None
        return cls(outside, always, after, tuple(sorted({len(lead) for lead in after})))


def _bans(logits: torch.Tensor, request: Request) -> TokenBans:
    if request.token_bans is None:
        request.token_bans = TokenBans.of(request, logits.shape[0], logits.device)
    return request.token_bans


def apply_allowed_tokens(logits: torch.Tensor, request: Request) -> None:
    """Every token but ``allowed_token_ids`` banned."""
    if request.params.allowed_token_ids is not None:
        outside = _bans(logits, request).outside_allowed
        assert outside is not None
        logits.masked_fill_(outside, float("-inf"))


def apply_bad_words(logits: torch.Tensor, request: Request) -> None:
    """The last token of each bad-word sequence banned where the output ends with the rest of it
    (a one-token word: everywhere)."""
    if not request.params.bad_words_token_ids:
        return
    bans = _bans(logits, request)
    if bans.always is not None:
        logits[bans.always] = float("-inf")
    output = request.output_token_ids
    for length in bans.lead_lengths:
        if length <= len(output):
            banned = bans.after.get(tuple(output[-length:]))
            if banned:
                logits[banned] = float("-inf")


def block_stop_tokens(logits: torch.Tensor, request: Request) -> None:
    """Until `min_tokens` are out, EOS and stop token ids cannot be chosen. Counted by the position
    sampled, which holds the tokens still in flight too: it needs no token read first."""
    if request.sampling_position >= request.params.min_tokens:
        return
    banned = [t for t in (*request.eos_token_ids, *request.params.stop_token_ids) if t < logits.shape[0]]
    if banned:
        logits[banned] = float("-inf")


def needs_processing(request: Request) -> bool:
    params = request.params
    return (
        bool(params.logit_bias)
        or params.allowed_token_ids is not None
        or bool(params.bad_words_token_ids)
        or needs_history(request)
    )


def needs_row_processing(request: Request) -> bool:
    """Whether the request's row goes through the processors applied a row at a time (the
    penalties are applied to all rows at once, `penalty_state.py`; structured outputs too)."""
    params = request.params
    return (
        bool(params.logit_bias)
        or params.allowed_token_ids is not None
        or bool(params.bad_words_token_ids)
        or request.sampling_position < params.min_tokens
    )


def needs_history(request: Request) -> bool:
    """Whether the request's logits processing depends on the tokens it has produced so far (a
    grammar's mask on every token before it, a bad word of several tokens on the last few, the
    penalties on all of them, min_tokens on their number)."""
    return (
        reads_history_on_host(request)
        or has_penalty(request)
        or request.sampling_position < request.params.min_tokens
    )


def reads_history_on_host(request: Request) -> bool:
    """Whether the request's logits processing reads its tokens so far on the host, which must then
    hold its last sampled token before it samples again. The penalties do not (they count the drawn
    tokens where they are drawn, `penalty_state.py`), nor does min_tokens (it counts positions)."""
    return request.grammar is not None or any(len(ids) > 1 for ids in request.params.bad_words_token_ids)
