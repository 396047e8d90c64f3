"""Temperature sampling in Triton, over the logits once: the exponential race, fused.

The torch path draws a random row with ``argmax(softmax(logits / T) / E)``, E ~ Exp(1): at 256
rows of a 151,936-token vocabulary each float32 pass moves 155 MB, and it makes several (scale,
softmax, the noise, the division, the argmax). The same race needs no normalization:
``argmax(logits / T - log E)`` picks the same token, so a kernel reads each logit once, makes
its noise from Philox counters in registers and keeps a running argmax.

Two things shape the kernel:
- Each row's vocabulary is split into parts raced by programs of their own (``default_num_chunks``),
  and a second small kernel picks the best part of each row. With one program a row, a step of
  a few sequences would walk 149 loop steps of 1,024 tokens on as many multiprocessors as it has
  rows.
- One Philox call gives the uniform draws of four tokens (``tl.rand4x``). Compiled for sm_90a,
  the loop body comes to about 113 PTX instructions a token, against 142 with a call per token;
  the two logarithms are most of the rest. So at 256 rows the arithmetic, not the 155 MB read, still
  bounds the kernel (an estimate from the PTX, not a measurement), at a fraction of the torch
  race's passes over memory.

It serves rows that only scale by a temperature: no top-k, top-p or min-p filter and no seed of
their own (a seeded request draws from its own torch generator, so its tokens do not depend on the
batch). The draws come from ``seed`` and a per-call counter the caller advances.

This module imports triton at import time; import it only where triton is wanted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tokens per loop step of a program; a quarter of them are Philox calls (four draws each).
_BLOCK = 1024
# Loop steps in flight in a program: loads that feed no dot are pipelined only when asked.
_NUM_STAGES = 3
# Programs per multiprocessor the split of the vocabulary aims at: one row is 149 steps of 1,024
# tokens, so a program a row would leave a few rows' draws to a few multiprocessors. The kernel's
# arithmetic bounds it, so the warps of 8 programs (10 fit) hide each other's dependent chains.
_PROGRAMS_PER_SM = 8


# The seed changes every call, and the number of parts with the rows: specialized on their values
# (1, a multiple of 16, neither), a call would compile the kernel again whenever one fell in a
# class the earlier calls had not. ``chunk`` is always a multiple of the block, one class.
@triton.jit(do_not_specialize=["seed", "num_chunks"])
def _race_chunk_kernel(
    logits_ptr,
    inv_temperature_ptr,
    keys_ptr,
    ids_ptr,
    seed,
    vocab,
    stride_row,
    chunk,
    num_chunks,
    BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Grid ``(rows, num_chunks)``: program ``(r, c)`` races the tokens ``[c * chunk, (c + 1) *
    chunk)`` of row ``r`` (``chunk`` a multiple of ``BLOCK``) and writes its best key and token at
    ``[r, c]`` of ``keys`` and ``ids``. A token's key is ``logit / T - log(E)``, E ~ Exp(1).

    The noise of token ``t`` is word ``t % 4`` of Philox counter ``r * quads + t // 4``
    (``quads``: a row's tokens in fours): one call makes four tokens' draws, and a draw depends
    on the seed, the row and the token only, never on how the vocabulary is split."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    QUADS: tl.constexpr = BLOCK // 4
    inv_temperature = tl.load(inv_temperature_ptr + row)
    quads_per_row = (vocab + 3) // 4
    lanes = tl.arange(0, 4)
    best_key = tl.full([QUADS, 4], float("-inf"), dtype=tl.float32)
    best_id = tl.zeros([QUADS, 4], dtype=tl.int32)
    row_start = row.to(tl.int64) * stride_row
    first = part * chunk
    last = tl.minimum(first + chunk, vocab)
    for start in tl.range(first, last, BLOCK, num_stages=NUM_STAGES):
        quads = start // 4 + tl.arange(0, QUADS)
        ids = quads[:, None] * 4 + lanes[None, :]
        valid = ids < last
        logits = tl.load(logits_ptr + row_start + ids, mask=valid, other=float("-inf")).to(tl.float32)
        u0, u1, u2, u3 = tl.rand4x(seed, row * quads_per_row + quads)
        # join stacks along a new last axis, so the outer join's two halves alternate: lanes 0..3
        # of a quad get words 0..3 of its Philox call.
        uniform = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), [QUADS, 4])
        # U lies in [0, 1): E is never 0, which would make its token win whatever its logit; a U of
        # exactly 0 gives an infinite E, a token that cannot win (a 2**-32 chance, not a bias).
        exponential = -tl.log(uniform)
        key = tl.where(valid, logits * inv_temperature - tl.log(exponential), float("-inf"))
        better = key > best_key
        best_key = tl.where(better, key, best_key)
        best_id = tl.where(better, ids, best_id)
    # Two plain reductions, not an argmax: an index taken over a tile flattened to one axis would
    # count in the compiler's order, which need not be the ids' (the flattening may reorder the
    # keys' elements and not the ids'). The lowest id among equal keys wins, whatever the split.
    # Keys that are all NaN (NaN logits) match nothing: the part's first id then stands in, so no
    # id outside the vocabulary ever leaves the kernel.
    top_key = tl.max(best_key)
    token = tl.min(tl.where(best_key == top_key, best_id, last))
    token = tl.where(token < last, token, first)
    out = row * num_chunks + part
    tl.store(keys_ptr + out, top_key)
    tl.store(ids_ptr + out, token)


@triton.jit(do_not_specialize=["num_chunks"])
def _pick_best_chunk_kernel(keys_ptr, ids_ptr, out_ptr, num_chunks, MAX_CHUNKS_P2: tl.constexpr):
    """Grid ``(rows,)``: row ``r``'s token is the one of its part with the highest key. The tile
    fits the most parts the vocabulary can have, so the kernel compiles once per vocabulary, not
    once per power of two that the parts of a batch size come to."""
    row = tl.program_id(0)
    parts = tl.arange(0, MAX_CHUNKS_P2)
    mask = parts < num_chunks
    keys = tl.load(keys_ptr + row * num_chunks + parts, mask=mask, other=float("-inf"))
    _, best = tl.max(keys, axis=0, return_indices=True)
    token = tl.load(ids_ptr + row * num_chunks + best)
    tl.store(out_ptr + row, token.to(tl.int64))


def default_num_chunks(rows: int, vocab: int, device: torch.device) -> int:
    """How many parts each row's vocabulary is split into: enough programs for every
    multiprocessor of a GPU a few times over, and no part shorter than one loop step. One part
    on the CPU, where the interpreter runs one program at a time anyway."""
    if device.type != "cuda":
        return 1
    programs = _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(programs, rows), triton.cdiv(vocab, _BLOCK)))


def fused_inputs(logits: torch.Tensor, temperatures: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused sampler's logits with unit stride along the vocabulary, and its empty [rows] int64
    output on their device; a ValueError when ``temperatures`` is not one per row."""
    if logits.dim() != 2 or temperatures.shape != (logits.shape[0],):
        shapes = f"logits {tuple(logits.shape)} and temperatures {tuple(temperatures.shape)}"
        raise ValueError(f"{shapes} do not fit")
    tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    return (logits if logits.stride(1) == 1 else logits.contiguous()), tokens


def race_sample(
    logits: torch.Tensor, temperatures: torch.Tensor, seed: int, num_chunks: int | None = None
) -> torch.Tensor:
    """One token per row of ``logits`` ([rows, vocab], float32 or half precision, read as it is
    and widened in registers) drawn from ``softmax(logits / T)``, with
    ``temperatures`` ([rows], all above 0) on the logits' device; int64 ids on that device.
    ``num_chunks``: parts of the vocabulary raced apart (``default_num_chunks``); the tokens do
    not depend on it."""
    logits, tokens = fused_inputs(logits, temperatures)
    rows, vocab = logits.shape
    if rows == 0:
        return tokens
    wanted = num_chunks if num_chunks is not None else default_num_chunks(rows, vocab, logits.device)
    # Parts start at whole loop steps, so each step's tokens are whole Philox quads.
    chunk = triton.cdiv(triton.cdiv(vocab, max(wanted, 1)), _BLOCK) * _BLOCK
    parts = triton.cdiv(vocab, chunk)
    keys = torch.empty((rows, parts), dtype=torch.float32, device=logits.device)
    ids = torch.empty((rows, parts), dtype=torch.int32, device=logits.device)
    inv_temperature = temperatures.to(torch.float32).reciprocal()
    # Philox takes a 32-bit seed; the counter space per call is rows x vocab / 4.
    _race_chunk_kernel[(rows, parts)](
        logits, inv_temperature, keys, ids, seed & 0x7FFFFFFF, vocab, logits.stride(0), chunk, parts,
        BLOCK=_BLOCK, NUM_STAGES=_NUM_STAGES,
    )  # fmt: skip
    most_parts = triton.next_power_of_2(triton.cdiv(vocab, _BLOCK))
    _pick_best_chunk_kernel[(rows,)](keys, ids, tokens, parts, MAX_CHUNKS_P2=most_parts)
    return tokens
