"""Triton kernels for attention over the paged KV cache, and their Python wrappers.

Cache layout (see ``base.py``): ``[num_blocks, block_size, num_kv_heads, head_dim]``; a token's
slot is ``block_id * block_size + offset``. Every kernel reaches the cache token by token through
the block table, so any block size works (powers of two compile to shifts, others to divisions)
and a sequence's blocks may sit anywhere in the cache, in any order.

Grouped-query attention: the query heads that share one KV head are processed by the same
program, stacked as rows of one matrix, so each KV tile is read from memory once per group.

Softmax runs online in fp32 with base-2 exponentials: scores are pre-multiplied by
``scale * log2(e)``, so ``exp2`` gives the same weights as ``exp`` on the unscaled logits.

This module imports triton at import time; import it only where triton is wanted.
Set ``TRITON_INTERPRET=1`` before importing it to run the kernels on the CPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from inferd.layers.triton_pdl import launch_options, wait_for_previous_kernel

_LOG2_E = 1.4426950408889634
# tl.dot needs every matrix dimension to be at least 16 when compiled for a GPU.
_MIN_DOT_DIM = 16
# Decode tile: keys per loop turn and warps per program (Triton's default is 4). benchmarks/gpu.py
# sweeps both on a device; these are the values to change once its figures are in.
_DECODE_BLOCK_N = 64
_DECODE_NUM_WARPS = 4
_EXTEND_BLOCK_M = 64
_EXTEND_BLOCK_N = 64
_MAX_SPLITS = 16
# Below this many context tokens per split, splitting costs more in the reduce than it gains.
_MIN_TOKENS_PER_SPLIT = 256


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
        tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


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
    BLOCK_SIZE: tl.constexpr,
):
    """Fold one tile of keys into the running softmax state of a block of query rows.

    ``key_pos`` are context positions ``[BLOCK_N]``, ``key_valid`` marks those to read, and
    ``allowed`` is the ``[rows, BLOCK_N]`` mask of (query row, key) pairs that may attend.
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
    scores = tl.dot(q, k) * scale_log2
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
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


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
    BLOCK_SIZE: tl.constexpr,
    GROUP_P2: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Grid ``(num_seqs, num_kv_heads, num_splits)``: one query token per sequence.

    Split ``s`` covers its share of the sequence's context and writes its normalized output and
    log2-sum-exp; with one split, ``out_ptr`` is the final output (``stride_o_split`` is 0).
    """
    wait_for_previous_kernel(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
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
    ).to(k_cache_ptr.dtype.element_ty)

    # Split lengths follow the sequence's own length (a multiple of BLOCK_N), so the launch
    # depends on no host-side length and can be replayed in a CUDA graph.
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    # A finite start for the running max keeps exp2(m_i - m_new) defined for rows that see no key.
    m_i = tl.full([GROUP_P2], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([GROUP_P2], dtype=tl.float32)
    acc = tl.zeros([GROUP_P2, HEAD_DIM_P2], dtype=tl.float32)
    block_table_row_ptr = block_tables_ptr + seq * stride_bt_seq
    for tile_start in range(start, end, BLOCK_N):
        key_pos = tile_start + tl.arange(0, BLOCK_N)
        key_valid = key_pos < end
        allowed = head_mask[:, None] & key_valid[None, :]
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_row_ptr,
            kv_head, key_pos, key_valid, allowed, dims, dim_mask,
            stride_kc_block, stride_kc_tok, stride_kc_head,
            stride_vc_block, stride_vc_tok, stride_vc_head, scale_log2, BLOCK_SIZE,
        )  # fmt: skip

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
    BLOCK_SIZE: tl.constexpr,
    GROUP_P2: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
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
    ).to(k_cache_ptr.dtype.element_ty)

    # Keys up to the tile's last query position; a tile past the sequence's queries reads none.
    tile_has_rows = q_tile * BLOCK_Q < q_len
    key_end = tl.where(tile_has_rows, tl.minimum(context_len + (q_tile + 1) * BLOCK_Q, seq_len), 0)

    m_i = tl.full([BLOCK_Q * GROUP_P2], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_P2], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_P2, HEAD_DIM_P2], dtype=tl.float32)
    block_table_row_ptr = block_tables_ptr + seq * stride_bt_seq
    for tile_start in range(0, key_end, BLOCK_N):
        key_pos = tile_start + tl.arange(0, BLOCK_N)
        key_valid = key_pos < key_end
        allowed = row_mask[:, None] & (key_pos[None, :] <= q_pos[:, None]) & key_valid[None, :]
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, block_table_row_ptr,
            kv_head, key_pos, key_valid, allowed, dims, dim_mask,
            stride_kc_block, stride_kc_tok, stride_kc_head,
            stride_vc_block, stride_vc_tok, stride_vc_head, scale_log2, BLOCK_SIZE,
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
    """Split the context only when (sequence, KV head) programs alone would leave SMs idle."""
    programs = num_seqs * num_kv_heads
    wanted = math.ceil(num_sms / max(programs, 1))
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
) -> torch.Tensor:
    """Attention of one query token per sequence (``q``: ``[num_tokens, heads, head_dim]``, the
    token of sequence ``i`` at row ``query_start_loc[i]``) over its ``seq_lens[i]`` cached tokens.

    ``num_splits`` > 1 splits each context into that many parts run in parallel, then merged;
    it is an argument (see ``default_num_splits``) so a CUDA graph can fix it at capture.
    """
    _check_cache(k_cache, v_cache)
    q = _rows_contiguous(q)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group_size = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
    if num_splits == 1:
        partial, stride_split = out, 0
    else:
        partial_shape = (q.shape[0], num_heads, num_splits, head_dim)
        partial = torch.empty(partial_shape, dtype=torch.float32, device=q.device)
        stride_split = partial.stride(2)
    head_dim_p2 = _pow2_at_least(head_dim, _MIN_DOT_DIM)
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, partial, lse, block_tables, seq_lens, query_start_loc,
        scale * _LOG2_E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        partial.stride(0), partial.stride(1), stride_split,
        lse.stride(0), lse.stride(1),
        head_dim, group_size, num_splits,
        BLOCK_SIZE=k_cache.shape[1],
        GROUP_P2=_pow2_at_least(group_size, _MIN_DOT_DIM),
        HEAD_DIM_P2=head_dim_p2,
        BLOCK_N=_DECODE_BLOCK_N,
        num_warps=_DECODE_NUM_WARPS,
        **launch_options(),
    )  # fmt: skip
    if num_splits > 1:
        _merge_splits_kernel[(num_seqs, num_heads)](
            partial, lse, out, query_start_loc,
            partial.stride(0), partial.stride(1), partial.stride(2),
            lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            num_splits, head_dim,
            SPLITS_P2=_pow2_at_least(num_splits),
            HEAD_DIM_P2=head_dim_p2,
            **launch_options(),
        )  # fmt: skip
    return out


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
) -> torch.Tensor:
    """Causal attention of each sequence's new query rows over its whole context in the cache
    (earlier chunks and prefix-cache hits included); the new K/V must already be stored."""
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
        head_dim, group_size,
        BLOCK_SIZE=k_cache.shape[1],
        GROUP_P2=group_p2,
        BLOCK_Q=block_q,
        HEAD_DIM_P2=_pow2_at_least(head_dim, _MIN_DOT_DIM),
        BLOCK_N=_EXTEND_BLOCK_N,
    )  # fmt: skip
    return out
