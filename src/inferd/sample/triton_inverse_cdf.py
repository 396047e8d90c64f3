"""Temperature sampling in Triton by inverting the CDF: one uniform draw a row, not one a token.

The fused race (``sample/triton_sampling.py``) reads the logits once but makes a Philox draw and
two logarithms for every token: at 256 rows of a 151,936-token vocabulary that is 39 million
draws, and its arithmetic, not the 78 MB of bfloat16 logits, bounds it (0.66-0.76 ms a step on
an H200, where one pass over those logits takes about 0.02 ms). This kernel pair samples the same
distribution, ``softmax(logits / T)``, with about five operations a token and one exponential:

1. ``_block_mass_kernel``, grid ``(rows, parts)``: for each block of ``_BLOCK`` tokens, its largest
   scaled logit ``m_b = max(x)`` (``x = logit / T * log2(e)``) and its mass
   ``s_b = sum(2 ** (x - m_b))``, stored per block: no block's numbers depend on the split.
2. ``_pick_kernel``, one program a row: the blocks' masses on the row's scale,
   ``w_b = s_b * 2 ** (m_b - max m)``, their running sum, a uniform ``u`` from Philox; the block
   whose running sum first passes ``u * total``, then, within it, the token whose running sum does.

It reads the logits once, plus one block a row. The token of a seed is not the race's (another
method draws it), but both follow the softmax exactly up to float32 rounding: a token's chance is
its weight's share of a float32 sum, and a weight under 2**-126 of the largest counts as 0.

Rows with NaN or infinite logits get some id within the vocabulary. This module imports triton
at import time; import it only where triton is wanted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inferd.sample.triton_sampling import default_num_chunks, fused_inputs

# Tokens per block: the unit of the first kernel's loop and of the second kernel's last search.
_BLOCK = 1024
# Blocks in flight in a program of the first kernel.
_NUM_STAGES = 3
_LOG2E = 1.4426950408889634


# The parts change with the rows and the seed every call: specialized on their values (1, a
# multiple of 16, neither), a call would compile a kernel again whenever one fell in a new class.
@triton.jit(do_not_specialize=["blocks_per_part"])
def _block_mass_kernel(
    logits_ptr,
    inv_temperature_ptr,
    block_max_ptr,
    block_mass_ptr,
    vocab,
    stride_row,
    blocks_per_row,
    blocks_per_part,
    BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    LOG2E: tl.constexpr,
):
    """Grid ``(rows, parts)``: program ``(r, p)`` walks row ``r``'s blocks ``[p * blocks_per_part,
    (p + 1) * blocks_per_part)`` and stores each block's largest scaled logit and its mass at
    ``[r, block]`` of ``block_max`` and ``block_mass``. A block of no finite logit has mass 0."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    scale = tl.load(inv_temperature_ptr + row) * LOG2E
    offsets = tl.arange(0, BLOCK)
    row_start = row.to(tl.int64) * stride_row
    first = part * blocks_per_part
    last = tl.minimum(first + blocks_per_part, blocks_per_row)
    for block in tl.range(first, last, num_stages=NUM_STAGES):
        ids = block * BLOCK + offsets
        x = tl.load(logits_ptr + row_start + ids, mask=ids < vocab, other=float("-inf")).to(tl.float32)
        x = x * scale
        top = tl.max(x)
        # A block of -inf logits alone (the row's end past the vocabulary, masked tokens) would
        # make 2 ** (-inf - -inf), NaN; against 0 its mass is 0.
        mass = tl.sum(tl.exp2(x - tl.where(top == float("-inf"), 0.0, top)))
        out = row * blocks_per_row + block
        tl.store(block_max_ptr + out, top)
        tl.store(block_mass_ptr + out, mass)


@triton.jit(do_not_specialize=["seed"])
def _pick_kernel(
    logits_ptr,
    inv_temperature_ptr,
    block_max_ptr,
    block_mass_ptr,
    out_ptr,
    seed,
    vocab,
    stride_row,
    blocks_per_row,
    MAX_BLOCKS_P2: tl.constexpr,
    BLOCK: tl.constexpr,
    LOG2E: tl.constexpr,
):
    """Grid ``(rows,)``: row ``r``'s token, by a uniform draw ``u`` (Philox counter ``r`` of
    ``seed``) against the running sum of its weights. The tile holds every block of the
    vocabulary, so the kernel compiles once per vocabulary.

    Each search takes the first entry whose running sum is above the target: such an entry's own
    weight is above 0, so a token of no weight (a -inf logit) is never drawn. Rounding can leave
    the target at or past the last running sum (``u * total`` rounded up, or a block's tokens
    summing a little under its mass); the last entry of any weight stands in then."""
    row = tl.program_id(0)
    blocks = tl.arange(0, MAX_BLOCKS_P2)
    in_row = blocks < blocks_per_row
    stats = row * blocks_per_row + blocks
    tops = tl.load(block_max_ptr + stats, mask=in_row, other=float("-inf"))
    masses = tl.load(block_mass_ptr + stats, mask=in_row, other=0.0)
    # A row of no finite logit scales against 0, not -inf, as its blocks did.
    top = tl.max(tops)
    top = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.where(masses > 0, masses * tl.exp2(tops - top), 0.0)
    running = tl.cumsum(weights, 0)
    target = tl.rand(seed, row) * tl.max(running)
    last_block = tl.max(tl.where(weights > 0, blocks, 0))
    chosen = tl.minimum(tl.sum((running <= target).to(tl.int32)), last_block)
    # The target's place within the chosen block: past the running sum of the blocks before it.
    before = tl.sum(tl.where(blocks == chosen - 1, running, 0.0))
    block_top = tl.sum(tl.where(blocks == chosen, tops, 0.0))
    block_top = tl.where(block_top == float("-inf"), 0.0, block_top)

    offsets = tl.arange(0, BLOCK)
    ids = chosen * BLOCK + offsets
    scale = tl.load(inv_temperature_ptr + row) * LOG2E
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + ids, mask=ids < vocab, other=float("-inf"))
    # Each token's weight on the row's scale, as its block's mass was put on it (0 past the vocabulary).
    token_weights = tl.exp2(x.to(tl.float32) * scale - block_top) * tl.exp2(block_top - top)
    token_running = tl.cumsum(token_weights, 0)
    last_token = tl.max(tl.where(token_weights > 0, offsets, 0))
    picked = tl.minimum(tl.sum((token_running <= target - before).to(tl.int32)), last_token)
    tl.store(out_ptr + row, (chosen * BLOCK + picked).to(tl.int64))


def inverse_cdf_sample(
    logits: torch.Tensor, temperatures: torch.Tensor, seed: int, num_chunks: int | None = None
) -> torch.Tensor:
    """One token per row of ``logits`` ([rows, vocab], float32 or half precision, read as it is
    and widened in registers) drawn from ``softmax(logits / T)``, with ``temperatures`` ([rows],
    all above 0) on the logits' device; int64 ids on that device. ``num_chunks``: parts each row's
    blocks are split into for the first kernel (``default_num_chunks``); the tokens do not
    depend on it."""
    logits, tokens = fused_inputs(logits, temperatures)
    rows, vocab = logits.shape
    if rows == 0:
        return tokens
    blocks = triton.cdiv(vocab, _BLOCK)
    wanted = num_chunks if num_chunks is not None else default_num_chunks(rows, vocab, logits.device)
    per_part = triton.cdiv(blocks, max(wanted, 1))
    block_max = torch.empty((rows, blocks), dtype=torch.float32, device=logits.device)
    block_mass = torch.empty((rows, blocks), dtype=torch.float32, device=logits.device)
    inv_temperature = temperatures.to(torch.float32).reciprocal()
    _block_mass_kernel[(rows, triton.cdiv(blocks, per_part))](
        logits, inv_temperature, block_max, block_mass, vocab, logits.stride(0), blocks, per_part,
        BLOCK=_BLOCK, NUM_STAGES=_NUM_STAGES, LOG2E=_LOG2E,
    )  # fmt: skip
    _pick_kernel[(rows,)](
        logits, inv_temperature, block_max, block_mass, tokens, seed & 0x7FFFFFFF, vocab, logits.stride(0),
        blocks, MAX_BLOCKS_P2=triton.next_power_of_2(blocks), BLOCK=_BLOCK, LOG2E=_LOG2E,
    )  # fmt: skip
    return tokens
