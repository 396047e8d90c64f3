"""Logit processors applied per request before sampling."""

from __future__ import annotations

import torch

from inferd.engine.request import Request


def apply_penalties(logits: torch.Tensor, request: Request) -> None:
    """Repetition (HF style, over prompt and output), presence and frequency (OpenAI style, output only)."""
    params = request.params
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(request.all_token_ids, dtype=torch.long, device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(
            values > 0, values / params.repetition_penalty, values * params.repetition_penalty
        )
    if (params.presence_penalty or params.frequency_penalty) and request.output_token_ids:
        out = torch.tensor(request.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=logits.shape[0]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, request: Request) -> None:
    for token_id, bias in request.params.logit_bias.items():
        if 0 <= token_id < logits.shape[0]:
            logits[token_id] += bias


def apply_allowed_tokens(logits: torch.Tensor, request: Request) -> None:
    """Every token but ``allowed_token_ids`` banned."""
    allowed = request.params.allowed_token_ids
    if allowed is None:
        return
    keep = torch.tensor([t for t in allowed if t < logits.shape[0]], dtype=torch.long, device=logits.device)
    banned = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    banned[keep] = False
    logits.masked_fill_(banned, float("-inf"))


def apply_bad_words(logits: torch.Tensor, request: Request) -> None:
    """The last token of each bad-word sequence banned where the output ends with the rest of it
    (a one-token word: everywhere)."""
    output = request.output_token_ids
    banned = [
        ids[-1]
        for ids in request.params.bad_words_token_ids
        if ids[-1] < logits.shape[0] and (len(ids) == 1 or output[len(output) - len(ids) + 1 :] == ids[:-1])
    ]
    if banned:
        logits[banned] = float("-inf")


def block_stop_tokens(logits: torch.Tensor, request: Request) -> None:
    """Until `min_tokens` are out, EOS and stop token ids cannot be chosen."""
    if len(request.output_token_ids) >= request.params.min_tokens:
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


def needs_history(request: Request) -> bool:
    """Whether the request's logits processing reads the tokens it has produced so far (a
    grammar's mask depends on every token before it, a bad word of several tokens on the last
    few)."""
    params = request.params
    return (
        request.grammar is not None
        or any(len(ids) > 1 for ids in params.bad_words_token_ids)
        or params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
        or len(request.output_token_ids) < params.min_tokens
    )
