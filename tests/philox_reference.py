"""Triton's Philox draws (``tl.rand``, ``tl.rand4x``) computed in numpy: what the fused samplers'
tests check each token's or row's noise against."""

from __future__ import annotations

import numpy as np


def philox_uniforms(seed: int, counters: np.ndarray) -> np.ndarray:
    """[n, 4] float32 draws for ``counters``, as Triton's ``rand4x`` makes them: Philox4x32 with
    10 rounds on (counter, 0, 0, 0) keyed by the seed's low and high words, each output word
    taken as an int32 (negative ones complemented) times 4.6566127342e-10."""
    mask = np.uint64(0xFFFFFFFF)
    zeros = np.zeros_like(counters, dtype=np.uint64)
    c0, c1, c2, c3 = counters.astype(np.uint64) & mask, zeros, zeros, zeros
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    round_a, round_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        product_b, product_a = round_b * c2, round_a * c0
        c0, c2 = (product_b >> np.uint64(32)) ^ c1 ^ k0, (product_a >> np.uint64(32)) ^ c3 ^ k1
        c1, c3 = product_b & mask, product_a & mask
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    words = np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32).view(np.int32)
    return np.where(words < 0, ~words, words).astype(np.float32) * np.float32(4.6566127342e-10)
