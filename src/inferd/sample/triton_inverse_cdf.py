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
   ``w_b = s_b * 2 ** (m_b - max m)``, their running sum, two uniforms from one Philox call; the
   block whose running sum first passes ``u1 * total``, then, within it, the token whose running
   sum of ``2 ** (x - m_b)`` first passes ``u2 * s_b``: a block, then a token of it, each drawn by
   its share, which is the token's share of the row.

It reads the logits once, plus one block a row. The token of a seed is not the race's (another
method draws it), but both follow the softmax up to float32 rounding. Here that rounding is a
running float32 sum's: a block whose mass is under about 2**-24 of the blocks' running sum where
it comes, or a token under that share of its block's, may pass its chance to the next entry of
some weight (or lose it at the end of the sum). A block of one dominant token can so drop tail
tokens of under 1e-7 of its mass; the race, a key per token, resolves those. A token of no weight
(a -inf logit) is never drawn.

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


@triton.jit
def _first_past(weights, uniform, indices, SIZE: tl.constexpr):
    """The index of the first entry of some weight whose running sum passes ``uniform`` of the
    weights' sum: entry ``i`` with probability ``weights[i] / sum``.

    An entry of no weight is never taken, whatever the scan's rounding: a compiled scan sums each
    lane's prefix in its own order, so the running sum may rise by an ulp across an entry of
    weight 0. Where rounding leaves the target at or past every running sum, the last entry of
    some weight stands in; with none (a NaN row), entry 0."""
    running = tl.cumsum(weights, 0)
    target = uniform * tl.max(running)
    first = tl.min(tl.where((running > target) & (weights > 0), indices, SIZE))
    last = tl.max(tl.where(weights > 0, indices, 0))
    return tl.where(first == SIZE, last, first)


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
    """Grid ``(rows,)``: row ``r``'s token, by two uniform draws (words 0 and 1 of Philox counter
    ``r`` of ``seed``): the block by the first against the running sum of the blocks' weights,
    then the token by the second against the running sum of the block's own. The tile holds every
    block of the vocabulary, so the kernel compiles once per vocabulary."""
    row = tl.program_id(0)
    u_block, u_token, _, _ = tl.rand4x(seed, row)
    blocks = tl.arange(0, MAX_BLOCKS_P2)
    in_row = blocks < blocks_per_row
    stats = row * blocks_per_row + blocks
    tops = tl.load(block_max_ptr + stats, mask=in_row, other=float("-inf"))
    masses = tl.load(block_mass_ptr + stats, mask=in_row, other=0.0)
    # A row of no finite logit scales against 0, not -inf, as its blocks did.
    top = tl.max(tops)
    top = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.where(masses > 0, masses * tl.exp2(tops - top), 0.0)
    chosen = _first_past(weights, u_block, blocks, MAX_BLOCKS_P2)
    block_top = tl.sum(tl.where(blocks == chosen, tops, 0.0))
    block_top = tl.where(block_top == float("-inf"), 0.0, block_top)

    offsets = tl.arange(0, BLOCK)
    ids = chosen * BLOCK + offsets
    scale = tl.load(inv_temperature_ptr + row) * LOG2E
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + ids, mask=ids < vocab, other=float("-inf"))
    # Each token's weight as the block's mass summed it (0 past the vocabulary and for -inf).
    token_weights = tl.exp2(x.to(tl.float32) * scale - block_top)
    picked = _first_past(token_weights, u_token, offsets, BLOCK)
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
