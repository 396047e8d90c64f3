"""Triton kernels for the small per-layer ops: RMSNorm (alone or fused with the residual add),
rotate-half rotary embedding of q and k, and SiLU-and-mul; with their Python wrappers.

Each op reads its input once and writes its output once, where the torch path makes a float32
copy and several intermediates. The math follows the torch layers step for step (float32 inside,
rounded to the input dtype where torch rounds), so both paths agree to float32 rounding.

Every wrapper returns new tensors and leaves its inputs untouched. Launch grids depend on shapes
only and nothing reads a device value on the host, so the ops can be captured in a CUDA graph.

This module imports triton at import time; import it only where triton is wanted.
Set ``TRITON_INTERPRET=1`` before importing it to run the kernels on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inferd.attention.triton_kv_dtype import as_cached
from inferd.layers.triton_pdl import launch_options, wait_for_previous_kernel

_SILU_BLOCK = 1024
# One warp per 256 elements of a norm row, within what one program can use well.
_NORM_ELEMENTS_PER_WARP = 256
_MAX_NORM_WARPS = 8


@triton.jit
def _normalize_and_store(
    x,
    weight_ptr,
    out_ptr,
    cols,
    mask,
    hidden,
    eps,
):
    """``weight * rmsnorm(x)`` for one row ``x`` already in the input dtype, stored at ``out_ptr``.

    Normalized in float32 and rounded to the input dtype before the weight multiplies it, as the
    torch layer does; the product of two half-precision values is exact in float32, so rounding
    it once gives the same value as torch's half-precision multiply.
    """
    x32 = x.to(tl.float32)
    mean_square = tl.sum(x32 * x32, axis=0) / hidden
    normed = (x32 * tl.rsqrt(mean_square + eps)).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = weight.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    weight_ptr,
    out_ptr,
    stride_x_outer,
    stride_x_inner,
    inner_size,
    hidden,
    eps,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """One program per row. Rows are ``[outer, inner]`` pairs so a strided 3-D view (per-head
    norm of q sliced out of the fused qkv output) needs no copy; the output is contiguous."""
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + (row // inner_size) * stride_x_outer + (row % inner_size) * stride_x_inner
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_row + cols, mask=mask, other=0.0)
    _normalize_and_store(x, weight_ptr, out_ptr + row * hidden, cols, mask, hidden, eps)


@triton.jit
def _fused_add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x_row,
    stride_r_row,
    hidden,
    eps,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """One program per row: ``residual_out = x + residual`` (summed in float32, stored in the
    input dtype), then the norm of that stored sum, as the torch path normalizes it."""
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0)
    residual = tl.load(residual_ptr + row * stride_r_row + cols, mask=mask, other=0.0)
    summed = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
    tl.store(residual_out_ptr + row * hidden + cols, summed, mask=mask)
    _normalize_and_store(summed, weight_ptr, out_ptr + row * hidden, cols, mask, hidden, eps)


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    norm_weight_ptr,
    stride_src_head,
    stride_dst_head,
    num_heads,
    cos,
    sin,
    dims,
    dim_mask,
    half_dim,
    eps,
    HEADS_P2: tl.constexpr,
    NORM: tl.constexpr,
):
    """Rotate-half rotation of all heads of one token: ``[x1, x2] -> [x1 c - x2 s, x2 c + x1 s]``.

    With ``NORM``, each head is first RMS-normalized over its ``2 * half_dim`` values and scaled by
    ``norm_weight`` (Qwen3's q/k norm), rounded where the torch layers round: the normalized head
    to the input dtype, then its product with the weight.
    """
    heads = tl.arange(0, HEADS_P2)[:, None]
    mask = (heads < num_heads) & dim_mask[None, :]
    src = src_ptr + heads * stride_src_head + dims[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + half_dim, mask=mask, other=0.0)
    if NORM:
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        mean_square = (tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / (2 * half_dim)
        scale = tl.rsqrt(mean_square + eps)[:, None]
        w1 = tl.load(norm_weight_ptr + dims, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(norm_weight_ptr + half_dim + dims, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
        x1 = (w1 * (a * scale).to(x1.dtype).to(tl.float32)).to(x1.dtype)
        x2 = (w2 * (b * scale).to(x2.dtype).to(tl.float32)).to(x2.dtype)
    in_ty = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    dst = dst_ptr + heads * stride_dst_head + dims[None, :]
    # The KV cache's type when k goes straight to its slot: an 8-bit cache takes the rotation as
    # every other path stores it, rounded to the model's dtype first and then to the cache's.
    out_ty = dst_ptr.dtype.element_ty
    tl.store(dst, as_cached((x1 * cos - x2 * sin).to(in_ty), out_ty), mask=mask)
    tl.store(dst + half_dim, as_cached((x2 * cos + x1 * sin).to(in_ty), out_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_out_ptr,
    k_out_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    q_norm_weight_ptr,
    k_norm_weight_ptr,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_qo_tok,
    stride_qo_head,
    stride_ko_tok,
    stride_ko_head,
    stride_cache_block,
    stride_cache_head,
    stride_cos_pos,
    stride_sin_pos,
    num_heads,
    num_kv_heads,
    half_dim,
    eps,
    HEADS_P2: tl.constexpr,
    KV_HEADS_P2: tl.constexpr,
    HALF_P2: tl.constexpr,
    NORM: tl.constexpr,
    STORE_KV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """One program per token: looks up its position's cos/sin row once, rotates q and k (after
    their per-head norms, with ``NORM``).

    With ``STORE_KV``, ``k_out_ptr`` and ``v_cache_ptr`` are the paged K and V caches (which share
    strides): the rotated k and the untouched v go straight to the token's slot, and a negative
    slot (padding) writes neither. ``stride_ko_tok`` is then the cache's stride between slots of
    a block.
    """
    wait_for_previous_kernel(PDL)
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    dims = tl.arange(0, HALF_P2)
    dim_mask = dims < half_dim
    cos = tl.load(cos_ptr + pos * stride_cos_pos + dims, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_sin_pos + dims, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(
        q_ptr + tok * stride_q_tok, q_out_ptr + tok * stride_qo_tok, q_norm_weight_ptr,
        stride_q_head, stride_qo_head, num_heads, cos, sin, dims, dim_mask, half_dim, eps,
        HEADS_P2, NORM,
    )  # fmt: skip
    if STORE_KV:
        slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
        if slot >= 0:
            slot_offset = (slot // BLOCK_SIZE) * stride_cache_block + (slot % BLOCK_SIZE) * stride_ko_tok
            _rotate_heads(
                k_ptr + tok * stride_k_tok, k_out_ptr + slot_offset, k_norm_weight_ptr,
                stride_k_head, stride_cache_head, num_kv_heads, cos, sin, dims, dim_mask, half_dim, eps,
                KV_HEADS_P2, NORM,
            )  # fmt: skip
            heads = tl.arange(0, KV_HEADS_P2)[:, None]
            mask = (heads < num_kv_heads) & dim_mask[None, :]
            src = v_ptr + tok * stride_v_tok + heads * stride_v_head + dims[None, :]
            dst = v_cache_ptr + slot_offset + heads * stride_cache_head + dims[None, :]
            cache_ty = v_cache_ptr.dtype.element_ty
            tl.store(dst, as_cached(tl.load(src, mask=mask), cache_ty), mask=mask)
            tl.store(dst + half_dim, as_cached(tl.load(src + half_dim, mask=mask), cache_ty), mask=mask)
    else:
        _rotate_heads(
            k_ptr + tok * stride_k_tok, k_out_ptr + tok * stride_ko_tok, k_norm_weight_ptr,
            stride_k_head, stride_ko_head, num_kv_heads, cos, sin, dims, dim_mask, half_dim, eps,
            KV_HEADS_P2, NORM,
        )  # fmt: skip


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,
    out_ptr,
    stride_in_row,
    stride_out_row,
    size,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Grid ``(rows, column blocks)``: ``silu(gate) * up`` with ``gate | up`` halves of a row.

    SiLU is computed in float32 and rounded to the input dtype before the product, where torch
    rounds it, so the two paths agree in half precision too.
    """
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < size
    gate_ptr = gate_up_ptr + row * stride_in_row + cols
    gate = tl.load(gate_ptr, mask=mask, other=0.0)
    up = tl.load(gate_ptr + size, mask=mask, other=0.0)
    gate32 = gate.to(tl.float32)
    activated = (gate32 / (1.0 + tl.exp(-gate32))).to(gate.dtype)
    out = activated.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out_row + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels step through the last dimension with unit stride; copy only when it is not."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _as_outer_inner_rows(x: torch.Tensor) -> torch.Tensor:
    """A 3-D ``[outer, inner, hidden]`` view of ``x``; rows are all leading dimensions."""
    if x.dim() == 1:
        x = x.view(1, 1, -1)
    elif x.dim() == 2:
        x = x.unsqueeze(1)
    elif x.dim() > 3:
        x = x.reshape(-1, x.shape[-2], x.shape[-1])  # copies only where no view exists
    return _last_dim_contiguous(x)


def _norm_launch(hidden: int) -> tuple[int, int]:
    """(block, num_warps) of a norm program covering a row of ``hidden`` elements."""
    block = triton.next_power_of_2(hidden)
    return block, min(max(block // _NORM_ELEMENTS_PER_WARP, 1), _MAX_NORM_WARPS)


def _check_norm_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit rows of {x.shape[-1]}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * rmsnorm(x)`` over the last dimension; any leading dimensions are rows.

    The output is contiguous, of ``x``'s shape, in the dtype torch would give ``weight * x``.
    """
    _check_norm_weight(x, weight)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x.numel() == 0:
        return out
    rows = _as_outer_inner_rows(x)
    hidden = rows.shape[2]
    block, num_warps = _norm_launch(hidden)
    _rms_norm_kernel[(rows.shape[0] * rows.shape[1],)](
        rows, _last_dim_contiguous(weight), out,
        rows.stride(0), rows.stride(1), rows.shape[1], hidden, eps,
        BLOCK=block, num_warps=num_warps,
        **launch_options(),
    )  # fmt: skip
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * rmsnorm(x + residual), x + residual)`` in one pass over the rows.

    The new residual is in ``x``'s dtype; both outputs are contiguous, of ``x``'s shape.
    """
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ in shape")
    _check_norm_weight(x, weight)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out, residual_out
    hidden = x.shape[-1]
    x_rows = _last_dim_contiguous(x.reshape(-1, hidden))
    residual_rows = _last_dim_contiguous(residual.reshape(-1, hidden))
    block, num_warps = _norm_launch(hidden)
    _fused_add_rms_norm_kernel[(x_rows.shape[0],)](
        x_rows, residual_rows, _last_dim_contiguous(weight), out, residual_out,
        x_rows.stride(0), residual_rows.stride(0), hidden, eps,
        BLOCK=block, num_warps=num_warps,
        **launch_options(),
    )  # fmt: skip
    return out, residual_out


def apply_rotary_embedding(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of ``q`` ``[tokens, heads, dim]`` and ``k``
    ``[tokens, kv_heads, dim]`` by the angles of ``positions`` ``[tokens]``.

    ``cos_table``/``sin_table`` are ``[max_positions, dim / 2]`` (float32); q and k may be strided
    views (e.g. split from the fused qkv output). Returns new contiguous tensors, computed in float32.
    ``qk_norm`` = ``(q_weight, k_weight, eps)`` RMS-normalizes every head first (Qwen3's q/k norm),
    in the same pass; the weights must have q's dtype, as the model's do.

    The engine's layers use ``rotate_and_store_kv``, which also writes k and v into the paged
    cache; this is the same rotation for a caller without one (and what that op is tested against).
    """
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    q_out = _launch_rotary(q, k, None, k_out, positions, cos_table, sin_table, qk_norm, None)
    return q_out, k_out


def rotate_and_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """``apply_rotary_embedding``, with the rotated k and ``v`` written straight into their slots of
    the paged caches (``[num_blocks, block_size, kv_heads, dim]``; negative slots are skipped)
    instead of returned: one launch where there were two. Returns the rotated q."""
    if v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} and k {tuple(k.shape)} differ in shape")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"caches {tuple(k_cache.shape)} and {tuple(v_cache.shape)} must be "
                         "[blocks, block_size, kv_heads, dim] with the same strides")  # fmt: skip
    if k_cache.shape[2:] != k.shape[1:] or k_cache.stride(-1) != 1:
        raise ValueError(f"caches {tuple(k_cache.shape)} do not hold k {tuple(k.shape)} rows")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must have one slot per token")
    return _launch_rotary(q, k, v, k_cache, positions, cos_table, sin_table, qk_norm, (v_cache, slot_mapping))


def _launch_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    k_out: torch.Tensor,
    positions: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None,
    kv_store: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Checks the shared arguments and launches the kernel; ``k_out`` is a ``[tokens, kv_heads,
    dim]`` tensor or, with ``kv_store`` = ``(v_cache, slot_mapping)``, the K cache."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [tokens, heads, dim]")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"positions {tuple(positions.shape)} must have one entry per token")
    half_dim = q.shape[2] // 2
    if q.shape[2] % 2 or cos_table.shape[-1] != half_dim or sin_table.shape != cos_table.shape:
        raise ValueError(f"cos/sin tables {tuple(cos_table.shape)} do not fit head dim {q.shape[2]}")
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    v = _last_dim_contiguous(v) if v is not None else k  # v is unread without kv_store
    cos_table, sin_table = _last_dim_contiguous(cos_table), _last_dim_contiguous(sin_table)
    q_weight, k_weight, eps = qk_norm if qk_norm is not None else (q, k, 0.0)  # weights unread without
    if qk_norm is not None:
        for weight in (q_weight, k_weight):
            if weight.shape != (q.shape[2],) or weight.dtype != q.dtype:
                raise ValueError(f"q/k norm weight {tuple(weight.shape)} {weight.dtype} does not fit q")
        q_weight, k_weight = _last_dim_contiguous(q_weight), _last_dim_contiguous(k_weight)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return q_out
    if kv_store is not None:
        v_cache, slot_mapping = kv_store
        # Slots: block stride, slot-in-block stride and head stride of the (shared) cache layout.
        stride_ko_tok, stride_ko_head, stride_block = k_out.stride(1), k_out.stride(2), k_out.stride(0)
        block_size = k_out.shape[1]
    else:
        v_cache, slot_mapping = k_out, positions  # unread without kv_store
        stride_ko_tok, stride_ko_head, stride_block = k_out.stride(0), k_out.stride(1), 0
        block_size = 1
    _rotary_kernel[(q.shape[0],)](
        q, k, v, q_out, k_out, v_cache, slot_mapping, positions, cos_table, sin_table, q_weight, k_weight,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1), stride_ko_tok, stride_ko_head,
        stride_block, stride_ko_head,
        cos_table.stride(0), sin_table.stride(0),
        q.shape[1], k.shape[1], half_dim, eps,
        HEADS_P2=triton.next_power_of_2(q.shape[1]),
        KV_HEADS_P2=triton.next_power_of_2(k.shape[1]),
        HALF_P2=triton.next_power_of_2(half_dim),
        NORM=qk_norm is not None,
        STORE_KV=kv_store is not None,
        BLOCK_SIZE=block_size,
        **launch_options(),
    )  # fmt: skip
    return q_out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for a fused ``[..., 2 * size]`` projection -> ``[..., size]``."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"the last dimension ({gate_up.shape[-1]}) must hold two equal halves")
    size = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], size), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() == 0:
        return out
    rows = _last_dim_contiguous(gate_up.reshape(-1, 2 * size))
    out_rows = out.view(-1, size)
    block = min(triton.next_power_of_2(size), _SILU_BLOCK)
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(size, block))](
        rows, out_rows, rows.stride(0), out_rows.stride(0), size, BLOCK=block,
        **launch_options(),
    )  # fmt: skip
    return out
