"""The penalties of the count tables (`penalty_tables.py`) in one Triton pass.

The torch path gathers each penalized row's counts and prompt marks, then makes a dozen
elementwise passes over [rows, vocab]: at 256 rows of a 151,936-token vocabulary, some 4.5 GB read
and written. This kernel reads each row's logits, counts and prompt marks once and writes the
logits once, about 0.5 GB, with the same operations: a seen token's (prompt or output) positive
logit divided by the repetition penalty (rounded to nearest, as torch divides), a negative one
multiplied; then ``frequency * count + presence`` subtracted where the output holds the token. The
kernel is compiled without floating-point contraction, so that sum rounds twice, as torch's
separate kernels round it, rather than once in a fused multiply-add: the logits are the torch
path's to the bit.

This module imports triton at import time; import it only where triton is wanted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tokens a program penalizes: a row of Qwen3's vocabulary is 149 programs.
_BLOCK = 1024


@triton.jit
def _penalize_kernel(
    logits_ptr,
    stride_logits,
    rows_ptr,
    table_rows_ptr,
    counts_ptr,
    in_prompt_ptr,
    stride_table,
    repetition_ptr,
    presence_ptr,
    frequency_ptr,
    vocab,
    BLOCK: tl.constexpr,
):
    """Grid ``(penalized rows, vocab / BLOCK)``: program ``(i, part)`` penalizes the tokens
    ``[part * BLOCK, (part + 1) * BLOCK)`` of logits row ``rows[i]`` in place, from the tables' row
    ``table_rows[i]`` and the penalties at ``i``."""
    i = tl.program_id(0)
    part = tl.program_id(1)
    row = tl.load(rows_ptr + i).to(tl.int64)
    table_row = tl.load(table_rows_ptr + i).to(tl.int64)
    tokens = part * BLOCK + tl.arange(0, BLOCK)
    inside = tokens < vocab
    logit = tl.load(logits_ptr + row * stride_logits + tokens, mask=inside, other=0.0)
    count = tl.load(counts_ptr + table_row * stride_table + tokens, mask=inside, other=0)
    in_prompt = tl.load(in_prompt_ptr + table_row * stride_table + tokens, mask=inside, other=0)
    repetition = tl.load(repetition_ptr + i)
    presence = tl.load(presence_ptr + i)
    frequency = tl.load(frequency_ptr + i)
    in_output = count > 0
    repeated = tl.where(logit > 0, tl.math.div_rn(logit, repetition), logit * repetition)
    logit = tl.where((in_prompt != 0) | in_output, repeated, logit)
    subtracted = tl.where(in_output, frequency * count.to(tl.float32) + presence, 0.0)
    tl.store(logits_ptr + row * stride_logits + tokens, logit - subtracted, mask=inside)


def penalize(
    logits: torch.Tensor,
    rows: torch.Tensor,
    table_rows: torch.Tensor,
    counts: torch.Tensor,
    in_prompt: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> None:
    """Penalizes, in place, the float32 ``logits`` rows ``rows`` (int64, on the logits' device)
    from the rows ``table_rows`` of ``counts`` ([table rows, vocab] int32) and ``in_prompt`` (the
    same shape, bool), with each row's float32 ``repetition``, ``presence`` and ``frequency``
    penalties. A row whose repetition penalty is 1 and whose others are 0 comes out unchanged."""
    if logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError("the penalties' kernel takes float32 logits with contiguous rows")
    if counts.stride() != in_prompt.stride() or counts.stride(1) != 1:
        raise ValueError("the count tables must be contiguous and alike")
    num_rows, vocab = rows.shape[0], logits.shape[1]
    if num_rows == 0:
        return
    grid = (num_rows, triton.cdiv(vocab, _BLOCK))
    _penalize_kernel[grid](
        logits,
        logits.stride(0),
        rows,
        table_rows,
        counts,
        in_prompt.view(torch.uint8),
        counts.stride(0),
        repetition,
        presence,
        frequency,
        vocab,
        BLOCK=_BLOCK,
        enable_fp_fusion=False,
    )
