"""Lower bounds on generation time from bytes moved and flops done, per engine step.

A decode step must read every weight once and the KV cache of every running sequence; it must
also do two flops per weight per token plus the attention products. The step cannot finish
before ``max(bytes / bandwidth, flops / matmul_rate)``. Summing over an ideal schedule (every
prompt prefilled at once, then all sequences decoded together) gives the floor that a measured
run is compared with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the floor depends on."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    bytes_per_param: int = 2  # bf16

    @property
    def matmul_params(self) -> int:
        """Weights multiplied with every token: projections, MLP and the LM head."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = self.hidden_size * (q + 2 * kv) + q * self.hidden_size
        per_layer = attention + 3 * self.hidden_size * self.intermediate_size
        return self.num_layers * per_layer + self.vocab_size * self.hidden_size

    @property
    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one step reads. An untied embedding table is only indexed (a few
        rows), so it is left out; norms are too small to count."""
        return self.matmul_params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_param

    def flops_per_token(self, context_len: int) -> int:
        """Two flops per weight, plus q.k and p.v over ``context_len`` keys in every layer."""
        attention = 4 * self.num_layers * self.num_heads * self.head_dim * context_len
        return 2 * self.matmul_params + attention


@dataclass(frozen=True)
class Ceilings:
    bandwidth_bytes_s: float
    matmul_flops_s: float

    def step_time(self, num_bytes: float, flops: float) -> float:
        return max(num_bytes / self.bandwidth_bytes_s, flops / self.matmul_flops_s)


def prefill_floor_s(shape: ModelShape, prompt_lens: Sequence[int], ceilings: Ceilings) -> float:
    """All prompts in one step: weights once, the prompts' K/V written, causal attention flops."""
    flops = sum(sum(shape.flops_per_token(pos + 1) for pos in range(n)) for n in prompt_lens)
    num_bytes = shape.weight_bytes_per_step + sum(prompt_lens) * shape.kv_bytes_per_token
    return ceilings.step_time(num_bytes, flops)


def step_floor_s(shape: ModelShape, spans: Sequence[tuple[int, int]], ceilings: Ceilings) -> float:
    """One step as the engine scheduled it: each sequence runs ``num_tokens`` new tokens after
    ``start`` cached ones, given as ``(start, num_tokens)``. The weights are read once, every
    sequence's K/V (cached and new) once, and each new token attends to the keys up to its own."""
    num_bytes = shape.weight_bytes_per_step + sum(start + n for start, n in spans) * shape.kv_bytes_per_token
    flops = sum(shape.flops_per_token(start + t + 1) for start, n in spans for t in range(n))
    return ceilings.step_time(num_bytes, flops)


def decode_floor_s(
    shape: ModelShape, prompt_lens: Sequence[int], output_lens: Sequence[int], ceilings: Ceilings
) -> float:
    """Every sequence decodes from the first step on; the prefill already produced output token 1,
    so step ``k`` runs the sequences that want more than ``k`` tokens, at context ``prompt + k``."""
    total = 0.0
    for step in range(1, max(output_lens)):
        contexts = [p + step for p, n in zip(prompt_lens, output_lens, strict=True) if n > step]
        num_bytes = shape.weight_bytes_per_step + sum(contexts) * shape.kv_bytes_per_token
        flops = sum(shape.flops_per_token(c) for c in contexts)
        total += ceilings.step_time(num_bytes, flops)
    return total


def generation_floor_s(
    shape: ModelShape, prompt_lens: Sequence[int], output_lens: Sequence[int], ceilings: Ceilings
) -> float:
    prefill = prefill_floor_s(shape, prompt_lens, ceilings)
    return prefill + decode_floor_s(shape, prompt_lens, output_lens, ceilings)
