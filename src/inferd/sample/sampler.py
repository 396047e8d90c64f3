"""Turns the last-position logits of a step into one token per sequence (plus log-probabilities)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from inferd.engine.request import Request
from inferd.sample.penalties import apply_logit_bias, apply_penalties, block_stop_tokens, needs_processing


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probability of the chosen token and the top-N alternatives (from the raw model output)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        # Draws for requests without a seed of their own.
        self._generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> SampleResult:
        """``logits``: [num_seqs, vocab] float32 on any device; one row per request."""
        logits = logits.float()
        raw_logprobs = self._raw_logprobs(logits, requests)
        logits = self._process(logits, requests)

        tokens = torch.argmax(logits, dim=-1).cpu()
        random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if random_rows:
            probs = self._filtered_probs(logits[random_rows], [requests[i] for i in random_rows]).cpu()
            for row, i in enumerate(random_rows):
                generator = requests[i].generator or self._generator
                tokens[i] = torch.multinomial(probs[row], 1, generator=generator).item()
        token_list = tokens.tolist()
        return SampleResult(token_list, _pick_logprobs(raw_logprobs, requests, token_list))

    @staticmethod
    def _raw_logprobs(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor | None:
        if all(r.params.logprobs is None for r in requests):
            return None
        return torch.log_softmax(logits, dim=-1).cpu()

    @staticmethod
    def _process(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        rows = [i for i, r in enumerate(requests) if needs_processing(r)]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            apply_penalties(logits[i], requests[i])
            apply_logit_bias(logits[i], requests[i])
            block_stop_tokens(logits[i], requests[i])
        return logits

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor([r.params.temperature for r in requests], device=device)
        logits = logits / temperature.unsqueeze(1)
        vocab = logits.shape[1]
        top_k = torch.tensor(
            [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in requests], device=device
        )
        top_p = torch.tensor([r.params.top_p for r in requests], device=device)
        min_p = torch.tensor([r.params.min_p for r in requests], device=device)

        if bool((top_k < vocab).any()) or bool((top_p < 1.0).any()):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab, device=device).unsqueeze(0)
            drop = ranks >= top_k.unsqueeze(1)
            sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the token crossing it stays).
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop |= mass_before >= top_p.unsqueeze(1)
            drop[:, 0] = False
            logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(dim=-1)
        if bool((min_p > 0).any()):
            threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs


def _pick_logprobs(
    raw: torch.Tensor | None, requests: Sequence[Request], tokens: list[int]
) -> list[TokenLogprobs | None]:
    if raw is None:
        return [None] * len(requests)
    result: list[TokenLogprobs | None] = []
    for i, request in enumerate(requests):
        n = request.params.logprobs
        if n is None:
            result.append(None)
            continue
        top: tuple[tuple[int, float], ...] = ()
        if n > 0:
            values, ids = raw[i].topk(n)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        result.append(TokenLogprobs(tokens[i], float(raw[i, tokens[i]]), top))
    return result
