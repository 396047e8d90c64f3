"""Rotary position embeddings (default, linear, Llama 3 and YaRN frequency scaling), looked up by position."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from inferd.config import RopeConfig
from inferd.layers.norm import RMSNorm


def inverse_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    # float32 throughout, as the reference does, so positions land on the same angles.
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rope.rope_type == "linear":  # positions divided by the factor: the same as slower frequencies
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scale(inv_freq, rope)
    if rope.rope_type == "yarn":
        return _yarn_scale(inv_freq, head_dim, rope)
    return inv_freq


def attention_scaling(rope: RopeConfig) -> float:
    """The factor YaRN puts on cos and sin (so on every attention logit, twice); 1 otherwise."""
    if rope.rope_type != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.mscale and rope.mscale_all_dim:
        return _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
    return _yarn_mscale(rope.factor)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_scale(inv_freq: torch.Tensor, head_dim: int, rope: RopeConfig) -> torch.Tensor:
    # Dimensions that turn fewer than beta_slow times over the pretrained context are interpolated
    # (divided by the factor), those that turn more than beta_fast times are kept, and a linear
    # ramp over the dimension index blends the ones between.
    def dimension_of(rotations: float) -> float:
        wavelengths = rope.original_max_position_embeddings / (rotations * 2 * math.pi)
        return head_dim * math.log(wavelengths) / (2 * math.log(rope.theta))

    low, high = dimension_of(rope.beta_fast), dimension_of(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return inv_freq / rope.factor * ramp + inv_freq * (1 - ramp)


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, and the band between blended.
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


@dataclass(frozen=True)
class GatheredRotary:
    """The torch path: each token's cos/sin rows, [tokens, 1, dim / 2], gathered once per step."""

    cos: torch.Tensor
    sin: torch.Tensor

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _rotate(q, self.cos, self.sin), _rotate(k, self.cos, self.sin)

    def apply_normed(
        self, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(q_norm(q), k_norm(k))


@dataclass(frozen=True)
class TritonRotary:
    """The Triton path: the kernel reads each token's row of the tables itself, so the step
    needs no gather of its own."""

    positions: torch.Tensor
    cos_table: torch.Tensor
    sin_table: torch.Tensor
    # A pure decode step's attention rotates and stores itself (``Attention.forward``).
    in_decode_attention: bool = False

    def rotate_and_store(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        slot_mapping: torch.Tensor,
        qk_norms: tuple[RMSNorm, RMSNorm] | None = None,
    ) -> torch.Tensor:
        """The rotation (after the q/k norms, if given) with the new k and v written into their
        cache slots, all in one kernel: three launches fewer per layer than norms, rotary and KV
        store apart. Returns the rotated q."""
        from inferd.layers import triton_ops

        return triton_ops.rotate_and_store_kv(
            q, k, v, self.positions, self.cos_table, self.sin_table, kv_cache[0], kv_cache[1], slot_mapping,
            qk_norm=qk_norm_weights(qk_norms),
        )  # fmt: skip


def qk_norm_weights(
    qk_norms: tuple[RMSNorm, RMSNorm] | None,
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """The q/k norms as the Triton kernels take them: both weights and one epsilon (both norms
    come from the model's one ``rms_norm_eps``)."""
    return (qk_norms[0].weight, qk_norms[1].weight, qk_norms[0].eps) if qk_norms else None


# One step's rotation: built once per step from its positions, applied in every layer. The torch
# path rotates q and k and leaves the KV store to the attention backend; the Triton path stores too.
RotaryStep = GatheredRotary | TritonRotary


class RotaryEmbedding(nn.Module):
    """Precomputes cos/sin for every position up to ``max_positions`` (rotate-half convention)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, rope)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        # Every path (torch, the Triton rotary, decode attention's) reads these tables, so a
        # scaling of cos and sin done here holds for all of them.
        scale = attention_scaling(rope)
        self.register_buffer("cos", angles.cos() * scale, persistent=False)
        self.register_buffer("sin", angles.sin() * scale, persistent=False)
        self.use_triton = False
        # With use_triton: the decode attention kernel does the rotation (``TritonRotary``).
        self.in_decode_attention = False

    def lookup(self, positions: torch.Tensor) -> RotaryStep:
        """The rotation of a step's positions; looked up once, used by every layer."""
        if self.use_triton:
            return TritonRotary(positions, self.cos, self.sin, self.in_decode_attention)
        return GatheredRotary(self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))


class FullAndSlidingRotary(nn.Module):
    """The full-attention layers' rotary and the sliding-window layers': their own where the
    config gives one (``sliding``: Gemma 3's, OLMo 3's), else the same."""

    def __init__(
        self, head_dim: int, max_positions: int, full: RopeConfig, sliding: RopeConfig | None
    ) -> None:
        super().__init__()
        self.full = RotaryEmbedding(head_dim, max_positions, full)
        self.sliding = self.full if sliding is None else RotaryEmbedding(head_dim, max_positions, sliding)

    def lookup(self, positions: torch.Tensor) -> tuple[RotaryStep, RotaryStep]:
        """The step's rotations for the full layers and for the sliding ones (once if the same)."""
        full = self.full.lookup(positions)
        return full, (full if self.sliding is self.full else self.sliding.lookup(positions))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x32 = x.float()
    x1, x2 = x32[..., :half], x32[..., half:]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
