"""The Triton side of ``kv_dtype.py``: how the kernels store into an 8-bit float KV cache and in
which dtype they attend. Imports triton at import time."""

from __future__ import annotations

import triton
import triton.language as tl

# e4m3's largest finite value (``kv_dtype.FP8_KV_MAX``) and its smallest normal one.
_FP8_MAX = tl.constexpr(448.0)
_FP8_MIN_NORMAL = tl.constexpr(2.0**-6)
# Added to a magnitude below the smallest normal, this makes float32's spacing e4m3's subnormal
# step (2**-9), so the addition rounds to it.
_SUBNORMAL_SHIFT = tl.constexpr(2.0**14)


@triton.jit
def as_cached(x, cache_ty: tl.constexpr):
    """``x`` as a cache of ``cache_ty`` holds it: for 8-bit floats clamped to their range first
    (as ``kv_dtype.to_cache``), else only cast.

    The rounding to e4m3 (to nearest, ties to even, as torch's cast) is done here in float32 and
    integer steps, so that the cast after it is exact: Triton's interpreter rounds that cast wrongly
    where a value rounds up into the next power of two (0.49 to 0.25) and in the subnormals, so
    the CPU tests would otherwise check another rounding than a GPU's. Normal values keep 3 of
    float32's 23 mantissa bits (rounded on the 20 dropped); smaller ones round at 2**-9."""
    if cache_ty.is_fp8():
        x = x.to(tl.float32)
        not_a_number = x != x
        x = tl.clamp(x, -_FP8_MAX, _FP8_MAX)
        bits = x.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
        size = tl.abs(x)
        tiny = (size + _SUBNORMAL_SHIFT) - _SUBNORMAL_SHIFT
        tiny = tl.where(bits < 0, -tiny, tiny)
        rounded = tl.where(size < _FP8_MIN_NORMAL, tiny, normal).to(cache_ty)
        # A NaN stays one (torch's cast keeps it), written as e4m3's NaN bits for the same reason.
        stored = tl.where(not_a_number, tl.full(x.shape, 0x7F, tl.uint8).to(cache_ty, bitcast=True), rounded)
    else:
        stored = x.to(cache_ty)
    return stored


@triton.jit
def as_query(q, cache_ty: tl.constexpr, query_ty: tl.constexpr):
    """Queries in the dtype attention computes in: the cache's, or, when the cache holds 8-bit
    floats, the queries' own (the keys and values read are widened to it)."""
    if cache_ty.is_fp8():
        q = q.to(query_ty)
    else:
        q = q.to(cache_ty)
    return q
