"""Turns the last-position logits of a step into one token per sequence (plus log-probabilities).

Everything stays on the logits' device until the chosen tokens (and the few log-probabilities
asked for) are copied back once per step: no [batch, vocab] tensor crosses to the host.
Random rows are drawn with the exponential race (argmax of p / E, E ~ Exp(1)), which samples
from p exactly and lets each seeded request draw from its own generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
    # Row -> why it failed: a logits processor raised for that request alone; its token is
    # meaningless and the request must end with an error while the others go on.
    errors: dict[int, str] = field(default_factory=dict)


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        # Draws for requests without a seed of their own, one generator per device.
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> SampleResult:
        """``logits``: [num_seqs, vocab] on any device; one row per request."""
        logits = logits.float()
        wants_logprobs = any(r.params.logprobs is not None for r in requests)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        errors: dict[int, str] = {}
        logits = self._process(logits, requests, errors)

        tokens = torch.argmax(logits, dim=-1)
        random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            picked = [requests[i] for i in random_rows]
            probs = self._filtered_probs(logits.index_select(0, rows), picked)
            tokens[rows] = self._draw(probs, picked)
        token_list = tokens.tolist()
        if raw_logprobs is None:
            return SampleResult(token_list, [None] * len(requests), errors)
        return SampleResult(token_list, _pick_logprobs(raw_logprobs, requests, tokens), errors)

    def _draw(self, probs: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        device = probs.device
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        noise = torch.empty_like(probs).exponential_(generator=self._generators[device])
        for row, request in enumerate(requests):
            if request.params.seed is None:
                continue
            if request.generator is None:
                # Made on first use, on the device that samples; it follows the request through
                # preemption, so its draws depend on the seed alone, never on the batch.
                request.generator = torch.Generator(device=device).manual_seed(request.params.seed)
            noise[row].exponential_(generator=request.generator)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _process(logits: torch.Tensor, requests: Sequence[Request], errors: dict[int, str]) -> torch.Tensor:
        """Per-request logits processors; one that raises fails its own row (noted in `errors`)."""
        rows = [i for i, r in enumerate(requests) if needs_processing(r)]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            try:
                apply_penalties(logits[i], requests[i])
                apply_logit_bias(logits[i], requests[i])
                block_stop_tokens(logits[i], requests[i])
            except Exception as exc:
                errors[i] = f"logits processing failed: {type(exc).__name__}: {exc}"
        return logits

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor([r.params.temperature for r in requests], device=device)
        logits = logits / temperature.unsqueeze(1)
        vocab = logits.shape[1]
        top_ks = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in requests]
        top_ps = [r.params.top_p for r in requests]
        min_ps = [r.params.min_p for r in requests]

        if min(top_ks) < vocab or min(top_ps) < 1.0:
            top_k = torch.tensor(top_ks, device=device)
            top_p = torch.tensor(top_ps, device=device)
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
        if max(min_ps) > 0:
            min_p = torch.tensor(min_ps, device=device)
            threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs


def _pick_logprobs(
    raw: torch.Tensor, requests: Sequence[Request], tokens: torch.Tensor
) -> list[TokenLogprobs | None]:
    """Chosen-token and top-N log-probabilities, computed on the device, copied back small."""
    chosen = raw.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    most = max(r.params.logprobs or 0 for r in requests)
    top_values, top_ids = raw.topk(most, dim=-1) if most else (raw[:, :0], raw[:, :0].long())
    top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
    token_list = tokens.tolist()
    result: list[TokenLogprobs | None] = []
    for i, request in enumerate(requests):
        n = request.params.logprobs
        if n is None:
            result.append(None)
            continue
        top = tuple(zip(top_ids_list[i][:n], top_values_list[i][:n], strict=True))
        result.append(TokenLogprobs(token_list[i], chosen[i], top))
    return result
