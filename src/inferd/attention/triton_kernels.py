"""Triton kernels for attention over the paged KV cache, and their Python wrappers.

Cache layout (see ``base.py``): ``[num_blocks, block_size, num_kv_heads, head_dim]``; a token's
slot is ``block_id * block_size + offset``. Every kernel reaches the cache token by token through
the block table, so any block size works (powers of two compile to shifts, others to divisions)
and a sequence's blocks may sit anywhere in the cache, in any order.

Grouped-query attention: the query heads that share one KV head are processed by the same
program, stacked as rows of one matrix, so each KV tile is read from memory once per group.

Softmax runs online in fp32 with base-2 exponentials: scores are pre-multiplied by
``scale * log2(e)``, so ``exp2`` gives the same weights as ``exp`` on the unscaled logits. A
layer with a soft cap (Gemma 2's ``attn_logit_softcapping``, ``c * tanh(score / c)``) caps them in
that scaled form: ``c' * tanh(score' / c')`` with ``c' = c * log2(e)`` is the same cap.

This module imports triton at import time; import it only where triton is wanted.
Set ``TRITON_INTERPRET=1`` before importing it to run the kernels on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from inferd.attention.triton_kv_dtype import as_cached, as_query
from inferd.layers.triton_pdl import launch_options, wait_for_previous_kernel

_LOG2_E = 1.4426950408889634
# tl.dot needs every matrix dimension to be at least 16 when compiled for a GPU.
_MIN_DOT_DIM = 16
# Decode tile: keys per loop turn, warps per program (Triton's default is 4) and K/V tiles in
# flight (software-pipelining stages; Triton's default on CUDA is 3). benchmarks/gpu.py sweeps
# them on a device. On an H200 (2026-11-30, the workload's 256 sequences, two runs) 64 keys, 4
# warps and 2 stages, launched heads first, was the fastest of 13 tiles: 309 and 314 us a call
# (92% and 91% of the copy bandwidth) against 314 and 318 for 3 stages sequence first.
_DECODE_BLOCK_N = 64
_DECODE_NUM_WARPS = 4
_DECODE_NUM_STAGES = 2
# Launch order of the decode programs. Each token's K (and V) is one row of all KV heads (2 KB
# for Qwen3): by default consecutive programs are consecutive sequences of one head, so the
# programs in flight read 256-byte pieces of unrelated rows. Heads first, a sequence's programs
# run side by side and read its rows whole. On an H200 the workload ran 20,235 output tok/s heads
# first against the default's 19,485 and 19,698 (benchmarks/results/nvidia-h200-2026-11-30-a.json,
# variant heads_first): a gain within the workload's run-to-run spread, as is the kernel's alone.
_DECODE_HEADS_FIRST = True
_EXTEND_BLOCK_M = 64
_EXTEND_BLOCK_N = 64
_MAX_SPLITS = 16
# Below this many context tokens per split, splitting costs more in the reduce than it gains. On
# an H200 one sequence's 272-token context took 12.3 us a layer unsplit and 8.6 us split 3 ways
# with the merge; 64 (against 256 before) made batch-1 decode of Qwen3-0.6B 3.9% faster.
_MIN_TOKENS_PER_SPLIT = 64
# Decode programs wanted per SM before contexts are split. One fills every SM once; more would let
# a mid-size batch of uneven contexts (the tail of a long workload, a few programs per SM) balance
# its long and short programs, at the cost of the merge kernel. On an H200, 32 sequences of 900 to
# 2,047 tokens took 80-85 us a layer unsplit and 61-63 us split 2 ways (two runs); with 4
# programs per SM the workload ran 20,191 output tok/s against the default's 19,485 and 19,698
# (benchmarks/results/nvidia-h200-2026-11-30-a.json, variant split_mid), within its spread.
_DECODE_PROGRAMS_PER_SM = 4


def _pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(n))


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_kc_block,
    stride_kc_tok,
    stride_kc_head,
    stride_vc_block,
    stride_vc_tok,
    stride_vc_head,
    num_kv_heads,
    head_dim,
    BLOCK_SIZE: tl.constexpr,
    HEADS_P2: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
):
    """One program per new token: copy its K and V rows (all KV heads) into its cache slot."""
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    # A negative slot marks a token whose K/V must not be written (e.g. padding).
    if slot >= 0:
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        heads = tl.arange(0, HEADS_P2)[:, None]
        dims = tl.arange(0, HEAD_DIM_P2)[None, :]
        mask = (heads < num_kv_heads) & (dims < head_dim)
        k = tl.load(k_ptr + tok * stride_k_tok + heads * stride_k_head + dims, mask=mask)
        v = tl.load(v_ptr + tok * stride_v_tok + heads * stride_v_head + dims, mask=mask)
        k_dst = k_cache_ptr + block * stride_kc_block + offset * stride_kc_tok + heads * stride_kc_head + dims
        v_dst = v_cache_ptr + block * stride_vc_block + offset * stride_vc_tok + heads * stride_vc_head + dims
        tl.store(k_dst, as_cached(k, k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_dst, as_cached(v, v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tanh(x):
    """tanh through the sigmoid (``2 * sigmoid(2x) - 1``), which every Triton backend has."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _attend_tile(
    q,
    acc,
    m_i,
    l_i,
    k_cache_ptr,
    v_cache_ptr,
    block_table_row_ptr,
    kv_head,
    key_pos,
    key_valid,
    allowed,
    dims,
    dim_mask,
    stride_kc_block,
    stride_kc_tok,
    stride_kc_head,
    stride_vc_block,
    stride_vc_tok,
    stride_vc_head,
    scale_log2,
    softcap_log2,
    BLOCK_SIZE: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Fold one tile of keys into the running softmax state of a block of query rows.

    ``key_pos`` are context positions ``[BLOCK_N]``, ``key_valid`` marks those to read, and
    ``allowed`` is the ``[rows, BLOCK_N]`` mask of (query row, key) pairs that may attend. With
    ``SOFTCAP`` the scaled scores are capped at ``softcap_log2`` (see the module's docstring).
    Returns the updated ``(acc, m_i, l_i)``.
    """
    block_ids = tl.load(block_table_row_ptr + key_pos // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
    in_block = key_pos % BLOCK_SIZE
    k_ptrs = (
        k_cache_ptr
        + block_ids[None, :] * stride_kc_block
        + in_block[None, :] * stride_kc_tok
        + kv_head * stride_kc_head
        + dims[:, None]
    )
    k = tl.load(k_ptrs, mask=key_valid[None, :] & dim_mask[:, None], other=0.0)  # [HEAD_DIM, BLOCK_N]
    k = k.to(q.dtype)  # an 8-bit cache's keys widened to the queries' dtype (as_query)
    scores = tl.dot(q, k) * scale_log2
    if SOFTCAP:
        scores = _tanh(scores / softcap_log2) * softcap_log2
    scores = tl.where(allowed, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_ptrs = (
        v_cache_ptr
        + block_ids[:, None] * stride_vc_block
        + in_block[:, None] * stride_vc_tok
        + kv_head * stride_vc_head
        + dims[None, :]
    )
    v = tl.load(v_ptrs, mask=key_valid[:, None] & dim_mask[None, :], other=0.0)  # [BLOCK_N, HEAD_DIM]
    v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _decode_program(NUM_KV_HEADS: tl.constexpr, HEADS_FIRST: tl.constexpr):
    """This program's ``(sequence, KV head, split)`` in the grid ``_decode_grid`` launched."""
    if HEADS_FIRST:
        flat = tl.program_id(0)
        return flat // NUM_KV_HEADS, flat % NUM_KV_HEADS, tl.program_id(2)
    return tl.program_id(0), tl.program_id(1), tl.program_id(2)


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    lse_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    scale_log2,
    stride_q_tok,
    stride_q_head,
    stride_kc_block,
    stride_kc_tok,
    stride_kc_head,
    stride_vc_block,
    stride_vc_tok,
    stride_vc_head,
    stride_bt_seq,
    stride_o_row,
    stride_o_head,
    stride_o_split,
    stride_lse_seq,
    stride_lse_head,
    head_dim,
    group_size,
    num_splits,
    window,
    softcap_log2,
    BLOCK_SIZE: tl.constexpr,
    GROUP_P2: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
    PDL: tl.constexpr = False,
    SOFTCAP: tl.constexpr = False,
):
    """Grid ``_decode_grid(num_seqs, num_kv_heads, num_splits)``: one query token per sequence.

    Split ``s`` covers its share of the sequence's context and writes its normalized output and
    log2-sum-exp; with one split, ``out_ptr`` is the final output (``stride_o_split`` is 0).
    """
    wait_for_previous_kernel(PDL)
    seq, kv_head, split = _decode_program(NUM_KV_HEADS, HEADS_FIRST)
    seq_len = tl.load(seq_lens_ptr + seq)
    q_row = tl.load(query_start_loc_ptr + seq).to(tl.int64)

    group = tl.arange(0, GROUP_P2)
    head_mask = group < group_size
    heads = kv_head * group_size + group
    dims = tl.arange(0, HEAD_DIM_P2)
    dim_mask = dims < head_dim
    q = tl.load(
        q_ptr + q_row * stride_q_tok + heads[:, None] * stride_q_head + dims[None, :],
        mask=head_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    q = as_query(q, k_cache_ptr.dtype.element_ty, q_ptr.dtype.element_ty)

    start, end = _split_range(seq_len, window, num_splits, split, BLOCK_N)
    acc, m_i, l_i = _attend_range(
        q, start, end, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt_seq, kv_head,
        head_mask, dims, dim_mask, stride_kc_block, stride_kc_tok, stride_kc_head, stride_vc_block,
        stride_vc_tok, stride_vc_head, scale_log2, softcap_log2, BLOCK_SIZE, GROUP_P2, HEAD_DIM_P2, BLOCK_N,
        SOFTCAP,
    )  # fmt: skip
    _store_split_result(
        acc, m_i, l_i, out_ptr, lse_ptr, seq, q_row, split, heads, head_mask, dims, dim_mask,
        stride_o_row, stride_o_head, stride_o_split, stride_lse_seq, stride_lse_head,
    )  # fmt: skip


@triton.jit
def _rope_rows(
    src,
    norm_weight_ptr,
    dims,
    partners,
    mask,
    cos,
    sin,
    signs,
    head_dim,
    eps,
    NORM: tl.constexpr,
):
    """Rotate-half rotation of head rows, ``src`` ``[rows, 1]`` pointers to their starts, as
    ``layers/triton_ops.py``'s rotary kernel computes it: each dimension ``d`` pairs with
    ``partners[d]`` (``d +- head_dim / 2``), ``x[d] c + signs[d] x[partner] s``. With ``NORM``,
    each row is first RMS-normalized and scaled by ``norm_weight``, rounded where the torch layers
    round. Returns the rows in the input dtype."""
    x = tl.load(src + dims[None, :], mask=mask, other=0.0)
    partner = tl.load(src + partners[None, :], mask=mask, other=0.0)
    if NORM:
        a, b = x.to(tl.float32), partner.to(tl.float32)
        scale = tl.rsqrt(tl.sum(a * a, axis=1) / head_dim + eps)[:, None]
        valid = dims < head_dim
        w = tl.load(norm_weight_ptr + dims, mask=valid, other=0.0).to(tl.float32)[None, :]
        w_partner = tl.load(norm_weight_ptr + partners, mask=valid, other=0.0).to(tl.float32)[None, :]
        x = (w * (a * scale).to(x.dtype).to(tl.float32)).to(x.dtype)
        partner = (w_partner * (b * scale).to(x.dtype).to(tl.float32)).to(x.dtype)
    rotated = x.to(tl.float32) * cos[None, :] + signs[None, :] * partner.to(tl.float32) * sin[None, :]
    return rotated.to(x.dtype)


@triton.jit
def _paged_decode_rotary_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    lse_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    positions_ptr,
    slot_mapping_ptr,
    cos_ptr,
    sin_ptr,
    q_norm_weight_ptr,
    k_norm_weight_ptr,
    scale_log2,
    eps,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_cos_pos,
    stride_kc_block,
    stride_kc_tok,
    stride_kc_head,
    stride_vc_block,
    stride_vc_tok,
    stride_vc_head,
    stride_bt_seq,
    stride_o_row,
    stride_o_head,
    stride_o_split,
    stride_lse_seq,
    stride_lse_head,
    head_dim,
    group_size,
    num_splits,
    window,
    BLOCK_SIZE: tl.constexpr,
    GROUP_P2: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
    NORM: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """``_paged_decode_kernel`` from the projection's raw q, k and v: each program rotates its
    group's q rows itself (after the q/k norms with ``NORM``), and the split that holds the new
    token also rotates its k, stores it and v in their cache slot (a negative slot: not stored)
    and folds the new token into its softmax from registers, so it never reads that slot back.
    The rotary kernel's launch is saved; the results are those of the rotary kernel followed by
    ``_paged_decode_kernel``, up to the order of float32 sums and the new token's weight, which
    is not rounded to the cache's dtype here."""
    wait_for_previous_kernel(PDL)
    seq, kv_head, split = _decode_program(NUM_KV_HEADS, HEADS_FIRST)
    seq_len = tl.load(seq_lens_ptr + seq)
    q_row = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    position = tl.load(positions_ptr + q_row).to(tl.int64)

    group = tl.arange(0, GROUP_P2)
    head_mask = group < group_size
    heads = kv_head * group_size + group
    dims = tl.arange(0, HEAD_DIM_P2)
    dim_mask = dims < head_dim
    half = head_dim // 2
    first_half = dims < half
    partners = tl.where(first_half, dims + half, dims - half)
    signs = tl.where(first_half, -1.0, 1.0)
    angle_dims = tl.where(first_half, dims, dims - half)
    cos = tl.load(cos_ptr + position * stride_cos_pos + angle_dims, mask=dim_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + position * stride_cos_pos + angle_dims, mask=dim_mask, other=0.0).to(tl.float32)
    q_rows = q_ptr + q_row * stride_q_tok + heads[:, None] * stride_q_head
    q = _rope_rows(q_rows, q_norm_weight_ptr, dims, partners, head_mask[:, None] & dim_mask[None, :],
                   cos, sin, signs, head_dim, eps, NORM)  # fmt: skip
    q = as_query(q, k_cache_ptr.dtype.element_ty, q_ptr.dtype.element_ty)

    # The new token's k and v, made before the loop so the rotation's operands need not live
    # through it; the split that holds the token stores them.
    row_mask = (tl.arange(0, 1) < 1)[:, None] & dim_mask[None, :]
    k_row = k_ptr + q_row * stride_k_tok + kv_head * stride_k_head + tl.zeros([1, 1], dtype=tl.int64)
    k = _rope_rows(k_row, k_norm_weight_ptr, dims, partners, row_mask, cos, sin, signs, head_dim, eps, NORM)
    k = as_cached(k, k_cache_ptr.dtype.element_ty)
    v_row = v_ptr + q_row * stride_v_tok + kv_head * stride_v_head + tl.zeros([1, 1], dtype=tl.int64)
    v = as_cached(tl.load(v_row + dims[None, :], mask=row_mask, other=0.0), v_cache_ptr.dtype.element_ty)
    start, end = _split_range(seq_len, window, num_splits, split, BLOCK_N)
    new_pos = seq_len - 1  # not in the cache yet: folded in from registers below
    holds_new = (start <= new_pos) & (new_pos < end)
    slot = tl.load(slot_mapping_ptr + q_row).to(tl.int64)
    if holds_new & (slot >= 0):
        block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        k_dst = k_cache_ptr + block * stride_kc_block + offset * stride_kc_tok + kv_head * stride_kc_head
        v_dst = v_cache_ptr + block * stride_vc_block + offset * stride_vc_tok + kv_head * stride_vc_head
        tl.store(k_dst + dims[None, :], k, mask=row_mask)
        tl.store(v_dst + dims[None, :], v, mask=row_mask)

    acc, m_i, l_i = _attend_range(
        q, start, tl.minimum(end, new_pos), k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt_seq,
        kv_head, head_mask, dims, dim_mask, stride_kc_block, stride_kc_tok, stride_kc_head, stride_vc_block,
        stride_vc_tok, stride_vc_head, scale_log2, 0.0, BLOCK_SIZE, GROUP_P2, HEAD_DIM_P2, BLOCK_N, False,
    )  # fmt: skip
    if holds_new:
        scores = tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1) * scale_log2
        scores = tl.where(head_mask, scores, float("-inf"))
        m_new = tl.maximum(m_i, scores)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
        m_i = m_new
    _store_split_result(
        acc, m_i, l_i, out_ptr, lse_ptr, seq, q_row, split, heads, head_mask, dims, dim_mask,
        stride_o_row, stride_o_head, stride_o_split, stride_lse_seq, stride_lse_head,
    )  # fmt: skip


@triton.jit
def _split_range(seq_len, window, num_splits, split, BLOCK_N: tl.constexpr):
    """Context positions ``[start, end)`` of split ``split``: the splits share the positions the
    query sees, the last ``window`` ones (a sliding-window layer) or all (``window`` 0). Split
    lengths follow the sequence's own length (a multiple of BLOCK_N), so the launch depends on no
    host-side length and can be replayed in a CUDA graph."""
    first = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    split_len = tl.cdiv(tl.cdiv(seq_len - first, num_splits), BLOCK_N) * BLOCK_N
    start = first + split * split_len
    return start, tl.minimum(start + split_len, seq_len)


@triton.jit
def _attend_range(
    q,
    start,
    end,
    k_cache_ptr,
    v_cache_ptr,
    block_table_row_ptr,
    kv_head,
    head_mask,
    dims,
    dim_mask,
    stride_kc_block,
    stride_kc_tok,
    stride_kc_head,
    stride_vc_block,
    stride_vc_tok,
    stride_vc_head,
    scale_log2,
    softcap_log2,
    BLOCK_SIZE: tl.constexpr,
    GROUP_P2: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """The softmax state ``(acc, m_i, l_i)`` of a group's query rows over cached positions
    ``[start, end)``, tile by tile."""
    # A finite start for the running max keeps exp2(m_i - m_new) defined for rows that see no key.
    m_i = tl.full([GROUP_P2], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([GROUP_P2], dtype=tl.float32)
    acc = tl.zeros([GROUP_P2, HEAD_DIM_P2], dtype=tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        key_pos = tile_start + tl.arange(0, BLOCK_N)
        key_valid = key_pos < end
        allowed = head_mask[:, None] & key_valid[None, :]
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_row_ptr,
            kv_head, key_pos, key_valid, allowed, dims, dim_mask,
            stride_kc_block, stride_kc_tok, stride_kc_head,
            stride_vc_block, stride_vc_tok, stride_vc_head, scale_log2, softcap_log2, BLOCK_SIZE, SOFTCAP,
        )  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def _store_split_result(
    acc,
    m_i,
    l_i,
    out_ptr,
    lse_ptr,
    seq,
    q_row,
    split,
    heads,
    head_mask,
    dims,
    dim_mask,
    stride_o_row,
    stride_o_head,
    stride_o_split,
    stride_lse_seq,
    stride_lse_head,
):
    """A split's normalized output and log2-sum-exp (a row without keys: zeros and -inf)."""
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + q_row * stride_o_row + heads[:, None] * stride_o_head + split * stride_o_split
    out_mask = head_mask[:, None] & dim_mask[None, :]
    tl.store(out_ptrs + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + seq * stride_lse_seq + heads * stride_lse_head + split, lse, mask=head_mask)


@triton.jit
def _merge_splits_kernel(
    partial_ptr,
    lse_ptr,
    out_ptr,
    query_start_loc_ptr,
    stride_p_row,
    stride_p_head,
    stride_p_split,
    stride_lse_seq,
    stride_lse_head,
    stride_o_row,
    stride_o_head,
    num_splits,
    head_dim,
    SPLITS_P2: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Grid ``(num_seqs, num_heads)``: combine the splits' outputs weighted by their sum-exp."""
    wait_for_previous_kernel(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_P2)
    split_mask = splits < num_splits
    dims = tl.arange(0, HEAD_DIM_P2)
    dim_mask = dims < head_dim
    lse = tl.load(lse_ptr + seq * stride_lse_seq + head * stride_lse_head + splits, mask=split_mask,
                  other=float("-inf"))  # fmt: skip
    lse_max = tl.max(lse, axis=0)
    # An empty sequence has no keys in any split: its output is zero, not NaN.
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_max)
    q_row = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    partial_ptrs = partial_ptr + q_row * stride_p_row + head * stride_p_head
    partial = tl.load(
        partial_ptrs + splits[:, None] * stride_p_split + dims[None, :],
        mask=split_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    total = tl.sum(weights, axis=0)
    out = tl.sum(partial * weights[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + q_row * stride_o_row + head * stride_o_head + dims, out.to(out_ptr.dtype.element_ty),
             mask=dim_mask)  # fmt: skip


@triton.jit
def _paged_extend_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    scale_log2,
    stride_q_tok,
    stride_q_head,
    stride_kc_block,
    stride_kc_tok,
    stride_kc_head,
    stride_vc_block,
    stride_vc_tok,
    stride_vc_head,
    stride_bt_seq,
    stride_o_tok,
    stride_o_head,
    head_dim,
    group_size,
    window,
    softcap_log2,
    BLOCK_SIZE: tl.constexpr,
    GROUP_P2: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr = False,
):
    """Grid ``(num_seqs, cdiv(max_query_len, BLOCK_Q), num_kv_heads)``: causal attention of a
    sequence's new query tokens over its whole context, read from the paged cache.

    Rows of the program's matrix are (query token, head of the group) pairs: row ``r`` is token
    ``r // GROUP_P2`` of the tile and head ``r % GROUP_P2`` of the group.
    """
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # tokens cached before this step's queries

    rows = tl.arange(0, BLOCK_Q * GROUP_P2)
    q_idx = q_tile * BLOCK_Q + rows // GROUP_P2
    group = rows % GROUP_P2
    row_mask = (q_idx < q_len) & (group < group_size)
    heads = kv_head * group_size + group
    q_pos = context_len + q_idx
    dims = tl.arange(0, HEAD_DIM_P2)
    dim_mask = dims < head_dim
    q_tok = (q_start + q_idx).to(tl.int64)
    q = tl.load(
        q_ptr + q_tok[:, None] * stride_q_tok + heads[:, None] * stride_q_head + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    q = as_query(q, k_cache_ptr.dtype.element_ty, q_ptr.dtype.element_ty)

    # Keys up to the tile's last query position; a tile past the sequence's queries reads none.
    tile_has_rows = q_tile * BLOCK_Q < q_len
    key_end = tl.where(tile_has_rows, tl.minimum(context_len + (q_tile + 1) * BLOCK_Q, seq_len), 0)
    # A sliding-window layer: from the first key the tile's first query sees.
    key_start = tl.where(window > 0, tl.maximum(context_len + q_tile * BLOCK_Q - window + 1, 0), 0)

    m_i = tl.full([BLOCK_Q * GROUP_P2], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_P2], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_P2, HEAD_DIM_P2], dtype=tl.float32)
    block_table_row_ptr = block_tables_ptr + seq * stride_bt_seq
    for tile_start in range(key_start, key_end, BLOCK_N):
        key_pos = tile_start + tl.arange(0, BLOCK_N)
        key_valid = key_pos < key_end
        allowed = row_mask[:, None] & (key_pos[None, :] <= q_pos[:, None]) & key_valid[None, :]
        allowed = allowed & ((window == 0) | (key_pos[None, :] > q_pos[:, None] - window))
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_row_ptr,
            kv_head, key_pos, key_valid, allowed, dims, dim_mask,
            stride_kc_block, stride_kc_tok, stride_kc_head,
            stride_vc_block, stride_vc_tok, stride_vc_head, scale_log2, softcap_log2, BLOCK_SIZE, SOFTCAP,
        )  # fmt: skip

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + q_tok[:, None] * stride_o_tok + heads[:, None] * stride_o_head + dims[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"caches must be [num_blocks, block_size, kv_heads, head_dim], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")  # fmt: skip
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the head dimension of the caches must be contiguous")


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dimension with unit stride; copy only when it is not."""
    return x if x.stride(-1) == 1 else x.contiguous()


def store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``k``/``v`` ``[num_tokens, kv_heads, head_dim]`` into the cache slots of ``slot_mapping``
    (negative slots are skipped)."""
    _check_cache(k_cache, v_cache)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = _rows_contiguous(k), _rows_contiguous(v)
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_kv_heads, head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        HEADS_P2=_pow2_at_least(num_kv_heads),
        HEAD_DIM_P2=_pow2_at_least(head_dim),
    )  # fmt: skip


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; the interpreter on the CPU counts as one."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 1


def longest_unsplit_context() -> int:
    """The longest context that ``default_num_splits`` never splits."""
    return 2 * _MIN_TOKENS_PER_SPLIT - 1


def default_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Split the context only when (sequence, KV head) programs alone would leave SMs idle, or give
    them fewer than ``_DECODE_PROGRAMS_PER_SM`` programs each."""
    programs = num_seqs * num_kv_heads
    wanted = math.ceil(_DECODE_PROGRAMS_PER_SM * num_sms / max(programs, 1))
    affordable = max_seq_len // _MIN_TOKENS_PER_SPLIT
    return max(1, min(wanted, affordable, _MAX_SPLITS))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Attention of one query token per sequence (``q``: ``[num_tokens, heads, head_dim]``, the
    token of sequence ``i`` at row ``query_start_loc[i]``) over its ``seq_lens[i]`` cached tokens,
    or the last ``window`` of them (a sliding-window layer; 0: all); ``softcap`` > 0 caps the
    scaled scores at it (``softcap * tanh(score / softcap)``).

    ``num_splits`` > 1 splits each context into that many parts run in parallel, then merged;
    it is an argument (see ``default_num_splits``) so a CUDA graph can fix it at capture.
    """
    _check_cache(k_cache, v_cache)
    q = _rows_contiguous(q)
    if out is None:
        out = torch.empty_like(q)
    step = _DecodeOutputs.allocate(out, seq_lens.shape[0], num_splits)
    if step is None:
        return out
    _paged_decode_kernel[_decode_grid(step.num_seqs, k_cache.shape[2], num_splits)](
        q, k_cache, v_cache, step.partial, step.lse, block_tables, seq_lens, query_start_loc,
        scale * _LOG2_E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        step.partial.stride(0), step.partial.stride(1), step.stride_split,
        step.lse.stride(0), step.lse.stride(1),
        q.shape[2], q.shape[1] // k_cache.shape[2], num_splits, window, softcap * _LOG2_E,
        **_decode_tile(q.shape[1] // k_cache.shape[2], q.shape[2], k_cache.shape[1], k_cache.shape[2]),
        SOFTCAP=softcap > 0,
        **launch_options(),
    )  # fmt: skip
    step.merge(query_start_loc)
    return out


def paged_decode_rotary_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    num_splits: int,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    window: int = 0,
) -> torch.Tensor:
    """``layers/triton_ops.rotate_and_store_kv`` then ``paged_decode_attention``, in one launch:
    ``q``, ``k``, ``v`` (``[num_tokens, heads, head_dim]``, strided views of the fused projection
    will do) are the step's unrotated rows; each sequence's new k and v go to its slot in the
    cache, as the rotary kernel stores them. ``qk_norm`` = ``(q_weight, k_weight, eps)``: Qwen3's
    per-head norms first. ``window``: as ``paged_decode_attention``'s. Returns the attention output,
    ``[num_tokens, heads, head_dim]``."""
    _check_cache(k_cache, v_cache)
    num_tokens, num_heads, head_dim = q.shape
    kv_shape = (num_tokens, k_cache.shape[2], head_dim)
    if k.shape != kv_shape or v.shape != kv_shape or k_cache.shape[3] != head_dim:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not fit the "
                         f"cache {tuple(k_cache.shape)}")  # fmt: skip
    if head_dim % 2 or cos_table.shape[-1] != head_dim // 2 or sin_table.shape != cos_table.shape:
        raise ValueError(f"cos/sin tables {tuple(cos_table.shape)} do not fit head dim {head_dim}")
    if positions.shape != (num_tokens,) or slot_mapping.shape != (num_tokens,):
        raise ValueError("positions and slot_mapping must have one entry per token")
    if min(q.stride(-1), k.stride(-1), v.stride(-1), cos_table.stride(-1), sin_table.stride(-1)) != 1:
        raise ValueError("q, k, v and the cos/sin tables must have unit stride along the head dimension")
    if cos_table.stride(0) != sin_table.stride(0):
        raise ValueError("the cos and sin tables must share their row stride")
    q_weight, k_weight, eps = qk_norm if qk_norm is not None else (q, k, 0.0)  # weights unread without
    if qk_norm is not None and any(w.shape != (head_dim,) or w.stride(0) != 1 for w in (q_weight, k_weight)):
        raise ValueError(f"q/k norm weights must be contiguous [{head_dim}] vectors")
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    step = _DecodeOutputs.allocate(out, seq_lens.shape[0], num_splits)
    if step is None:
        return out
    group_size = num_heads // k_cache.shape[2]
    _paged_decode_rotary_kernel[_decode_grid(step.num_seqs, k_cache.shape[2], num_splits)](
        q, k, v, k_cache, v_cache, step.partial, step.lse, block_tables, seq_lens, query_start_loc,
        positions, slot_mapping, cos_table, sin_table, q_weight, k_weight,
        scale * _LOG2_E, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_table.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        step.partial.stride(0), step.partial.stride(1), step.stride_split,
        step.lse.stride(0), step.lse.stride(1),
        head_dim, group_size, num_splits, window,
        **_decode_tile(group_size, head_dim, k_cache.shape[1], k_cache.shape[2]),
        NORM=qk_norm is not None,
        **launch_options(),
    )  # fmt: skip
    step.merge(query_start_loc)
    return out


def _decode_grid(num_seqs: int, num_kv_heads: int, num_splits: int) -> tuple[int, int, int]:
    """The decode kernels' grid, in the order ``_DECODE_HEADS_FIRST`` sets (``_decode_program``).
    Heads first, (sequence, KV head) pairs share the grid's first axis, the KV head the faster:
    only that axis may exceed 65,535 programs."""
    if _DECODE_HEADS_FIRST:
        return num_seqs * num_kv_heads, 1, num_splits
    return num_seqs, num_kv_heads, num_splits


def _decode_tile(group_size: int, head_dim: int, block_size: int, num_kv_heads: int) -> dict[str, int | bool]:
    """The decode kernels' shared tile constexprs and warps."""
    return {
        "BLOCK_SIZE": block_size,
        "GROUP_P2": _pow2_at_least(group_size, _MIN_DOT_DIM),
        "HEAD_DIM_P2": _pow2_at_least(head_dim, _MIN_DOT_DIM),
        "BLOCK_N": _DECODE_BLOCK_N,
        "NUM_KV_HEADS": num_kv_heads,
        "HEADS_FIRST": _DECODE_HEADS_FIRST,
        "num_warps": _DECODE_NUM_WARPS,
        "num_stages": _DECODE_NUM_STAGES,
    }


@dataclass(frozen=True)
class _DecodeOutputs:
    """Where a decode kernel writes: the output itself, unsplit, or per-split partial outputs
    and log2-sum-exps that ``merge`` combines into it."""

    out: torch.Tensor
    partial: torch.Tensor
    lse: torch.Tensor
    stride_split: int
    num_seqs: int
    num_splits: int

    @staticmethod
    def allocate(out: torch.Tensor, num_seqs: int, num_splits: int) -> _DecodeOutputs | None:
        """None when there is no sequence to attend for."""
        if num_seqs == 0:
            return None
        num_heads, head_dim = out.shape[1], out.shape[2]
        lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=out.device)
        if num_splits == 1:
            return _DecodeOutputs(out, out, lse, 0, num_seqs, 1)
        partial_shape = (out.shape[0], num_heads, num_splits, head_dim)
        partial = torch.empty(partial_shape, dtype=torch.float32, device=out.device)
        return _DecodeOutputs(out, partial, lse, partial.stride(2), num_seqs, num_splits)

    def merge(self, query_start_loc: torch.Tensor) -> None:
        if self.num_splits == 1:
            return
        out, partial, lse = self.out, self.partial, self.lse
        _merge_splits_kernel[(self.num_seqs, out.shape[1])](
            partial, lse, out, query_start_loc,
            partial.stride(0), partial.stride(1), partial.stride(2),
            lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            self.num_splits, out.shape[2],
            SPLITS_P2=_pow2_at_least(self.num_splits),
            HEAD_DIM_P2=_pow2_at_least(out.shape[2], _MIN_DOT_DIM),
            **launch_options(),
        )  # fmt: skip


def paged_extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Causal attention of each sequence's new query rows over its whole context in the cache
    (earlier chunks and prefix-cache hits included), or, with ``window``, over the last ``window``
    positions up to each row's own (a sliding-window layer); the new K/V must already be stored.
    ``softcap``: as ``paged_decode_attention``'s."""
    _check_cache(k_cache, v_cache)
    q = _rows_contiguous(q)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group_size = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0 or max_query_len == 0:
        return out
    group_p2 = _pow2_at_least(group_size)
    block_q = max(1, _EXTEND_BLOCK_M // group_p2)
    _paged_extend_kernel[(num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        scale * _LOG2_E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        head_dim, group_size, window, softcap * _LOG2_E,
        BLOCK_SIZE=k_cache.shape[1],
        GROUP_P2=group_p2,
        BLOCK_Q=block_q,
        HEAD_DIM_P2=_pow2_at_least(head_dim, _MIN_DOT_DIM),
        BLOCK_N=_EXTEND_BLOCK_N,
        SOFTCAP=softcap > 0,
    )  # fmt: skip
    return out
