"""Turns the last-position logits of a step into one token per sequence (plus log-probabilities).

Everything stays on the logits' device until the chosen tokens (and the few log-probabilities
asked for) are copied back once per step: no [batch, vocab] tensor crosses to the host. Nothing
in ``sample`` waits for the device either: small parameter tensors go up from pinned memory and
the results come down into pinned memory behind an event, so the host can schedule the next step
while this one runs; ``PendingSample.result`` is where the host waits.
Random rows are drawn with the exponential race (argmax of p / E, E ~ Exp(1)), which samples
from p exactly and lets each seeded request draw from its own generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from inferd.config import DEFAULT_FUSED_SAMPLER
from inferd.engine.request import Request, RequestFault
from inferd.sample.penalties import (
    apply_allowed_tokens,
    apply_bad_words,
    apply_logit_bias,
    block_stop_tokens,
    needs_processing,
    needs_row_processing,
)
from inferd.sample.penalty_state import HostPenalties, PenalizedStep, PenaltyState, has_penalty
from inferd.sample.penalty_tables import PenaltyTables
from inferd.structured.matcher import apply_bitmask, bitmask_words


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probability of the chosen token and the top-N alternatives (from the raw model output)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    # The chosen token's place in the vocabulary by log-probability, 1 the likeliest: how many
    # tokens are at least as likely as it (vLLM's rank, ties counted alike).
    rank: int


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    # Row -> why it failed: a logits processor raised for that request alone; its token is
    # meaningless and the request must end with an error while the others go on.
    errors: dict[int, str] = field(default_factory=dict)


@dataclass
class PendingSample:
    """A step's sampled tokens, on their way to the host."""

    token_ids: torch.Tensor  # [rows] int64 on the sampling device: the next step may feed them in
    errors: dict[int, str]
    _tokens_host: torch.Tensor
    # With logprobs: (chosen, ranks, top values, top ids) on their way, and the top-N asked for per row.
    _logprobs_host: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    _logprob_counts: list[int | None]
    _copied: torch.cuda.Event | None
    # Each row's largest logit, on its way: where it is not finite, the row had nothing to draw from.
    _peaks_host: torch.Tensor

    def result(self) -> SampleResult:
        """Wait for the copies (on a GPU) and return the tokens as Python values."""
        if self._copied is not None:
            self._copied.synchronize()
        tokens = self._tokens_host.tolist()
        peaks = self._peaks_host.tolist()
        if not all(map(math.isfinite, peaks)):
            for row, peak in enumerate(peaks):
                if not math.isfinite(peak):
                    self.errors.setdefault(row, _undrawable(peak))
        if self._logprobs_host is None:
            return SampleResult(tokens, [None] * len(tokens), self.errors)
        chosen, ranks, top_values, top_ids = (t.tolist() for t in self._logprobs_host)
        logprobs: list[TokenLogprobs | None] = []
        for i, n in enumerate(self._logprob_counts):
            if n is None:
                logprobs.append(None)
                continue
            top = tuple(zip(top_ids[i][:n], top_values[i][:n], strict=True))
            logprobs.append(TokenLogprobs(tokens[i], chosen[i], top, ranks[i]))
        return SampleResult(tokens, logprobs, self.errors)


def _undrawable(peak: float) -> str:
    """Why a row whose largest logit is ``peak`` (not finite) has no token: a NaN or +inf logit
    is a numerical fault (of the model, or of one request's input); -inf everywhere, the
    request's own limits leaving nothing. Greedy and every draw would still pick some token."""
    if peak == float("-inf"):
        return RequestFault(
            "no token can be sampled: the request's limits together (allowed_token_ids, bad_words, "
            "min_tokens, a structured-output constraint) exclude every token"
        )
    return f"the model's logits for this request are not finite (the largest is {peak})"


def chosen_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's log-probability of its token in ``tokens`` and that token's rank (1 the likeliest;
    the tokens at least as likely, itself among them)."""
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    ranks = (logprobs >= chosen.unsqueeze(1)).sum(dim=1)
    return chosen, ranks


# The fused race pays from about this many rows a step. On an H200 over Qwen3's vocabulary
# (benchmarks/gpu.py's sampler part, two calls on 2026-11-30) it took 0.66-0.76 ms at 256 rows
# against the torch race's 0.88-0.90, but 0.41-0.43 against 0.32-0.33 at 64 rows and 0.19-0.30
# against 0.12-0.19 at one: drawn through both points, the two costs cross at 128-134 rows.
FUSED_MIN_ROWS = 128

# The Triton kernels that may draw those rows: the race of sample/triton_sampling.py (the torch
# path's method, over the logits once) or the inverse CDF of sample/triton_inverse_cdf.py (one
# uniform draw a row instead of one a token).
FUSED_KERNELS = ("race", "inverse_cdf")


class Sampler:
    def __init__(
        self,
        seed: int = 0,
        triton_sampling: bool = False,
        fused_min_rows: int | None = None,
        fused_kernel: str = DEFAULT_FUSED_SAMPLER,
        penalty_tables: bool | None = None,
        triton_penalties: bool = False,
        penalty_rows: int | None = None,
    ) -> None:
        """``triton_sampling``: rows that only scale by a temperature are drawn by a fused Triton
        kernel (``fused_kernel``, one of ``FUSED_KERNELS``), in steps with at least
        ``fused_min_rows`` of them (``FUSED_MIN_ROWS`` unless given); fewer go to the torch race,
        which is faster there. ``penalty_tables``: the penalties count tokens in tables on the
        logits' device (``PenaltyTables``) rather than on the host (``HostPenalties``); None: on a
        GPU, or where ``triton_penalties`` asks for those tables' Triton pass. ``penalty_rows``:
        those tables make room by letting go of idle requests past this many rows."""
        if fused_kernel not in FUSED_KERNELS:
            choices = ", ".join(FUSED_KERNELS)
            raise ValueError(f"unknown fused sampler {fused_kernel!r}; choose one of {choices}")
        self._seed = seed
        self._triton_sampling = triton_sampling
        self._fused_min_rows = FUSED_MIN_ROWS if fused_min_rows is None else fused_min_rows
        self._fused_kernel = fused_kernel
        self._fused_calls = 0  # each call of the fused kernel draws from fresh counters
        self._penalty_tables = penalty_tables
        self._triton_penalties = triton_penalties
        self._penalty_rows = penalty_rows
        # Draws for requests without a seed of their own, one generator per device.
        self._generators: dict[torch.device, torch.Generator] = {}
        # The penalized requests' token counts, made with the first penalized row.
        self._penalties: PenaltyState | None = None

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> SampleResult:
        """``logits``: [num_seqs, vocab] on any device; one row per request."""
        return self.sample(logits, requests).result()

    def sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> PendingSample:
        """Queue the sampling of one token per row; the host does not wait for the device.

        ``logits`` may be in the model's dtype: they are widened to float32 only where something
        is computed from them (log-probabilities, logits processors, the torch race). A greedy
        argmax and the fused race read them as they are, which at 256 rows of a 151,936-token
        vocabulary saves a pass that reads 78 MB and writes 155 MB."""
        wants_logprobs = any(r.params.logprobs is not None for r in requests)
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if wants_logprobs else None
        errors: dict[int, str] = {}
        raw = logits
        logits, penalized = self._process(logits, requests, errors)

        random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        # Every row is drawn below when none is greedy: a pass over the logits saved. Else the
        # greedy pass gives every row's peak too, for the check of the rows in `result`.
        all_random = len(random_rows) == len(requests)
        if all_random:
            tokens = torch.empty(len(requests), dtype=torch.long, device=logits.device)
            peaks = logits.amax(dim=-1)
        else:
            peaks, tokens = logits.max(dim=-1)
        if logits is not raw:
            # Processed logits say whether the request's limits left any token (-inf everywhere:
            # none); whether the model's numerics failed, only its own logits say. A penalty may
            # make a logit infinite (a repetition penalty of 1e-300 divides by it), which is the
            # request's own doing, sampled as before.
            peaks = torch.where(peaks == float("-inf"), peaks, raw.amax(dim=-1))
        if self._triton_sampling:
            vocab = logits.shape[1]
            fused_rows = [i for i in random_rows if _temperature_only(requests[i], vocab)]
            if fused_rows and len(fused_rows) >= self._fused_min_rows:
                if len(fused_rows) == len(requests):  # every row, in order: no index, no scatter
                    tokens = self._draw_fused(logits, None, requests)
                else:
                    index = _to_device(fused_rows, torch.long, logits.device)
                    tokens[index] = self._draw_fused(logits, index, [requests[i] for i in fused_rows])
                fused = set(fused_rows)
                random_rows = [i for i in random_rows if i not in fused]
        if random_rows:
            picked = [requests[i] for i in random_rows]
            if len(random_rows) == len(requests):  # all rows, in order: no gather, no scatter
                tokens = self._draw(self._filtered_probs(logits, picked), picked)
            else:
                rows = _to_device(random_rows, torch.long, logits.device)
                tokens[rows] = self._draw(self._filtered_probs(logits.index_select(0, rows), picked), picked)
        if penalized is not None and self._penalties is not None:
            self._penalties.count_sampled(penalized, tokens)  # on the device: the next step reads them
        tokens_host, peaks_host = _to_host(tokens), _to_host(peaks)
        logprobs_host = None
        counts: list[int | None] = []
        if raw_logprobs is not None:
            chosen, ranks = chosen_logprobs(raw_logprobs, tokens)
            counts = [r.params.logprobs for r in requests]
            top_values, top_ids = raw_logprobs.topk(max(n or 0 for n in counts), dim=-1)
            logprobs_host = (_to_host(chosen), _to_host(ranks), _to_host(top_values), _to_host(top_ids))
        copied = None
        if logits.is_cuda:
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(logits.device))
        return PendingSample(tokens, errors, tokens_host, logprobs_host, counts, copied, peaks_host)

    def _draw_fused(
        self, logits: torch.Tensor, index: torch.Tensor | None, requests: Sequence[Request]
    ) -> torch.Tensor:
        """The fused kernel's tokens for the rows ``index`` of ``logits`` (``requests``' rows; None:
        every row)."""
        temperatures = _to_device([r.params.temperature for r in requests], torch.float32, logits.device)
        picked = logits if index is None else logits.index_select(0, index)
        self._fused_calls += 1
        seed = self._seed * 1_000_003 + self._fused_calls
        if self._fused_kernel == "inverse_cdf":
            from inferd.sample import triton_inverse_cdf

            return triton_inverse_cdf.inverse_cdf_sample(picked, temperatures, seed)
        from inferd.sample import triton_sampling

        return triton_sampling.race_sample(picked, temperatures, seed)

    def _draw(self, probs: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        device = probs.device
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        noise = torch.empty_like(probs).exponential_(generator=self._generators[device])
        rows_before: dict[int, int] = {}  # a request's rows earlier in this step (speculative decoding)
        for row, request in enumerate(requests):
            seed = request.params.seed
            if seed is None:
                continue
            if request.generator is None:
                request.generator = torch.Generator(device=device)  # made on first use, where it samples
            earlier = rows_before.get(id(request), 0)
            rows_before[id(request)] = earlier + 1
            # Each output position draws from its own seed: the draws depend on the request's seed
            # and the token's place in its output alone, never on the batch, on preemption, on a
            # retried step or on how many guesses speculative decoding ran before it.
            request.generator.manual_seed(_position_seed(seed, request.sampling_position + earlier))
            noise[row].exponential_(generator=request.generator)
        return (probs / noise).argmax(dim=-1)

    def forget(self, request_ids: Sequence[str]) -> None:
        """Requests that finished: their penalty state goes."""
        if self._penalties is not None and request_ids:
            self._penalties.forget(request_ids)

    def _process(
        self, logits: torch.Tensor, requests: Sequence[Request], errors: dict[int, str]
    ) -> tuple[torch.Tensor, PenalizedStep | None]:
        """Logits processors, then structured outputs' masks, on a float32 copy: the penalties of
        all rows at once, then the others a row at a time; one that raises fails its own rows
        (noted in `errors`). Also the penalized rows whose drawn tokens the penalties count."""
        if not any(needs_processing(r) for r in requests):
            return logits, None
        logits = logits.to(torch.float32, copy=True)
        penalized = None
        if any(has_penalty(r) for r in requests):
            if self._penalties is None:
                tables = self._penalty_tables
                if tables is None:
                    tables = logits.is_cuda or self._triton_penalties
                fused = self._triton_penalties
                self._penalties = PenaltyTables(self._penalty_rows, fused) if tables else HostPenalties()
            try:
                penalized = self._penalties.apply(logits, requests)
                errors.update(penalized.failed)
            except Exception as exc:
                for i, request in enumerate(requests):
                    if has_penalty(request):
                        errors[i] = f"logits processing failed: {type(exc).__name__}: {exc}"
        for i in [i for i, r in enumerate(requests) if needs_row_processing(r)]:
            try:
                apply_logit_bias(logits[i], requests[i])
                apply_allowed_tokens(logits[i], requests[i])
                apply_bad_words(logits[i], requests[i])
                block_stop_tokens(logits[i], requests[i])
            except Exception as exc:
                errors[i] = f"logits processing failed: {type(exc).__name__}: {exc}"
        _apply_grammars(logits, requests, errors)
        return logits, penalized

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        device = logits.device
        temperature = _to_device([r.params.temperature for r in requests], torch.float32, device)
        # Dividing by the float32 temperatures widens half-precision logits: one pass, not two.
        logits = logits / temperature.unsqueeze(1)
        vocab = logits.shape[1]
        top_ks = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in requests]
        top_ps = [r.params.top_p for r in requests]
        min_ps = [r.params.min_p for r in requests]

        if min(top_ks) < vocab or min(top_ps) < 1.0:
            top_k = _to_device(top_ks, torch.long, device)
            top_p = _to_device(top_ps, torch.float32, device)
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
            min_p = _to_device(min_ps, torch.float32, device)
            threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        typical_ps = [r.params.typical_p for r in requests]
        if min(typical_ps) < 1.0:
            probs = _keep_typical(probs, _to_device(typical_ps, torch.float32, device))
        return probs


def _keep_typical(probs: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling, after the other filters as transformers and TGI apply it: each
    row's tokens ordered by how far their surprise ``-log p`` lies from the entropy, kept up to and
    including the first at which their probability reaches ``mass`` (with any as far from it), the
    most typical always; rows whose ``mass`` is 1 are left as they are. The rows need not sum to 1
    (min-p zeroes tokens without renormalizing): the filter reads them renormalized."""
    normalized = probs / probs.sum(dim=-1, keepdim=True)
    log_p = normalized.log()
    entropy = -torch.where(normalized > 0, normalized * log_p, 0.0).sum(dim=-1, keepdim=True)
    distance = (-log_p - entropy).abs()  # inf for the tokens already dropped
    ordered, order = distance.sort(dim=-1)
    reached = normalized.gather(-1, order).cumsum(dim=-1)
    last = (reached < mass.unsqueeze(1)).sum(dim=-1, keepdim=True).clamp(max=probs.shape[-1] - 1)
    drop = distance > ordered.gather(-1, last)
    drop.scatter_(-1, order[:, :1], False)
    drop &= (mass < 1.0).unsqueeze(1)
    return probs.masked_fill(drop, 0.0)


def _apply_grammars(logits: torch.Tensor, requests: Sequence[Request], errors: dict[int, str]) -> None:
    """Keep each constrained row to the tokens its grammar allows next: the masks are made on the
    host, go up in one copy and are applied in one pass over those rows."""
    guided = [
        (i, g)
        for i, r in enumerate(requests)
        if (g := r.grammar) is not None and g.active and i not in errors
    ]
    if not guided:
        return
    words = max(bitmask_words(logits.shape[1]), *(grammar.words for _, grammar in guided))
    # Zeros: a row whose mask could not be made allows nothing; its request fails below anyway.
    bitmask = torch.zeros((len(guided), words), dtype=torch.int32, pin_memory=logits.is_cuda)
    for row, (i, grammar) in enumerate(guided):
        try:
            request = requests[i]
            # EOS ends an output wherever its grammar accepts one, unless the request ignores EOS.
            forbidden = request.eos_token_ids if request.params.ignore_eos else frozenset()
            grammar.fill_bitmask(bitmask[row, : grammar.words], forbidden)
        except Exception as exc:
            errors[i] = f"structured output failed: {type(exc).__name__}: {exc}"
    rows = _to_device([i for i, _ in guided], torch.long, logits.device)
    apply_bitmask(logits, rows, bitmask.to(logits.device, non_blocking=True))


def _position_seed(seed: int, position: int) -> int:
    """A 64-bit generator seed for one output position of a seeded request (a multiplicative
    hash of the position, so neighbouring positions' seeds are far apart)."""
    return (seed + (position + 1) * 0x9E3779B97F4A7C15) % 2**64


def _temperature_only(request: Request, vocab: int) -> bool:
    """A random row the fused kernel may draw: no filter and no generator of its own."""
    params = request.params
    return (params.seed is None and not 0 < params.top_k < vocab and params.top_p >= 1.0
            and params.min_p <= 0 and params.typical_p >= 1.0)  # fmt: skip


def _to_device(values: list[int] | list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor on ``device``; on a GPU it goes up from pinned memory without a host wait
    (the caching host allocator keeps the staging memory until the copy has run)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Start copying ``tensor`` into pinned host memory; read it after the step's event."""
    if not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
