"""Temperature sampling in one Triton pass over the logits: the exponential race, fused.

The torch path draws a random row with ``argmax(softmax(logits / T) / E)``, E ~ Exp(1): at 256
rows of a 151,936-token vocabulary each float32 pass moves 155 MB, and it makes several (scale,
softmax, the noise, the division, the argmax). The same race needs no normalization:
``argmax(logits / T - log E)`` picks the same token, so one kernel reads each row once, makes
its noise from Philox counters in registers (``tl.rand``) and keeps a running argmax.

It serves rows that only scale by a temperature: no top-k, top-p or min-p filter and no seed of
their own (a seeded request draws from its own torch generator, so its tokens do not depend on the
batch). The draws come from ``seed`` and a per-call counter the caller advances.

This module imports triton at import time; import it only where triton is wanted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


# The seed changes every call: specialized on its value (1, a multiple of 16, neither), a call
# would compile the kernel again whenever its seed fell in a class the earlier calls had not.
@triton.jit(do_not_specialize=["seed"])
def _race_sample_kernel(
    logits_ptr,
    inv_temperature_ptr,
    out_ptr,
    seed,
    vocab,
    stride_row,
    BLOCK: tl.constexpr,
):
    """Grid ``(rows,)``: row ``r``'s token is the argmax of ``logits / T - log(E)`` over the vocab."""
    row = tl.program_id(0)
    inv_temperature = tl.load(inv_temperature_ptr + row)
    cols = tl.arange(0, BLOCK)
    best_key = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_id = tl.zeros([BLOCK], dtype=tl.int32)
    row_start = row.to(tl.int64) * stride_row
    for start in range(0, vocab, BLOCK):
        ids = start + cols
        valid = ids < vocab
        logits = tl.load(logits_ptr + row_start + ids, mask=valid, other=float("-inf")).to(tl.float32)
        # One counter per (row, token) of this call: rows draw independent noise.
        uniform = tl.rand(seed, row * vocab + ids)
        # U lies in [0, 1): E is never 0, which would make its token win whatever its logit; a U of
        # exactly 0 gives an infinite E, a token that cannot win (a 2**-32 chance, not a bias).
        exponential = -tl.log(uniform)
        key = tl.where(valid, logits * inv_temperature - tl.log(exponential), float("-inf"))
        better = key > best_key
        best_key = tl.where(better, key, best_key)
        best_id = tl.where(better, ids, best_id)
    _, lane = tl.max(best_key, axis=0, return_indices=True)
    token = tl.sum(tl.where(cols == lane, best_id, 0), axis=0)
    tl.store(out_ptr + row, token.to(tl.int64))


def race_sample(logits: torch.Tensor, temperatures: torch.Tensor, seed: int) -> torch.Tensor:
    """One token per row of ``logits`` ([rows, vocab]) drawn from ``softmax(logits / T)``, with
    ``temperatures`` ([rows], all above 0) on the logits' device; int64 ids on that device."""
    if logits.dim() != 2 or temperatures.shape != (logits.shape[0],):
        shapes = f"logits {tuple(logits.shape)} and temperatures {tuple(temperatures.shape)}"
        raise ValueError(f"{shapes} do not fit")
    tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    if logits.shape[0] == 0:
        return tokens
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    inv_temperature = temperatures.to(torch.float32).reciprocal()
    # Philox takes a 32-bit seed; the counter space per call is rows x vocab.
    _race_sample_kernel[(logits.shape[0],)](
        logits, inv_temperature, tokens, seed & 0x7FFFFFFF, logits.shape[1], logits.stride(0), BLOCK=_BLOCK,
    )  # fmt: skip
    return tokens
