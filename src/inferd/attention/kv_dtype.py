"""8-bit float KV caches (engine option ``kv_cache_dtype="fp8"``): what a cache slot holds, and
what attention reads back from it.

A key or value is stored as e4m3, clamped to e4m3's range first (a cast alone gives no value past
it), with no scale here: a checkpoint's calibrated ``k_scale``/``v_scale`` are folded into the
model at load (``models/kv_scales.py``), so the keys and values that reach the cache are already
divided by them. Every attention reads the rounded values, the tokens of a fresh prompt too, so
a prompt attends alike whether its context came from the prefix cache or from this step.
"""

from __future__ import annotations

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_MAX = float(torch.finfo(FP8_KV_DTYPE).max)


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a cache of ``cache_dtype`` holds it."""
    if cache_dtype == FP8_KV_DTYPE:
        return x.clamp(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV_DTYPE)
    return x.to(cache_dtype)


def as_read_back(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """``x`` as attention reads it back from a cache of ``cache_dtype``, in ``x``'s dtype."""
    if cache_dtype == x.dtype:
        return x
    return to_cache(x, cache_dtype).to(x.dtype)
