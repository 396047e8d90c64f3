"""A Triton matmul for projections of one or two rows: ``x @ weight.T (+ bias)``.

In a decode step of one or two sequences, each projection reads its whole weight matrix to make
a row or two, so its time is the weight read. For the small matrices of a model like Qwen3-0.6B,
cuBLAS's kernels read them at 8% to 53% of an H200's copy bandwidth: at one row, 12.6 us for the
4 MB attention output projection (the sweep in ``BENCHMARKS.md``). Here each program owns
``BLOCK_N`` output features and walks the whole inner dimension, so no second pass adds up partial
sums, and the grid has hundreds to thousands of programs to keep every multiprocessor's loads in
flight. The arithmetic runs in float32 on the CUDA cores: at a row or two it is far below their
rate.

The layer routes only what a sweep on an H200 showed this kernel winning (``rows_routed``): one
row always (Qwen3-0.6B's four projections 4.9, 3.5, 5.9 and 4.0 us against cuBLAS's 5.3, 12.6,
5.9 and 6.6; Llama-3.1-8B's from 1% slower to 12% faster), and two rows where the output has at most
2,048 features, where cuBLAS finds too little parallel work. cuBLAS keeps the rest, where its
tiles reuse each weight across rows.

The kernel can also make its input rows as it loads them (``skinny_norm_linear``: the residual add
and RMSNorm before a projection; ``skinny_silu_linear``: SiLU-and-mul before the down projection),
which saves the small op's launch and its output's round trip. The decoder uses these only with
the engine option ``triton_fused_linear``, off by default: on an H200 the kernels alone beat the
two launches they replace, but whole batch-1 decode of Qwen3-0.6B did not gain.

The launch grid depends on shapes only, so the op can be captured in a CUDA graph. This module
imports triton at import time; import it only where triton is wanted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from inferd.layers import triton_pdl
from inferd.layers.linear_operands import WeightScale, check_linear_operands, unit_inner_stride
from inferd.layers.triton_pdl import launch_options, prefetch_to_l2, wait_for_previous_kernel

# What the decoder's projections send here (see the module's docstring).
MAX_FEATURES_FOR_TWO_ROWS = 2048
# The most rows the kernel takes: its products are held per row, in registers.
KERNEL_MAX_ROWS = 8
_WARPS = 4
# 4 features per program, 512 inner elements per step: on an H200 (BENCHMARKS.md) the fastest
# tile, or within 0.15 us of it, on Qwen3-0.6B's projections at one and two rows. On
# Llama-3.1-8B's larger ones other tiles ran up to 1.6 us faster at one row (4 x 2048 with 8
# warps) and 2.3 us at two; one tile for all stays until a per-shape table is measured.
_BLOCK_N = 4
_MAX_BLOCK_K = 512
# The tile of the kernels that make their input on load (default_fused_tile).
_FUSED_BLOCK_N = 8
_FUSED_BLOCK_K = 512
# Float32 products one program holds: 32 registers per thread.
_PRODUCTS_PER_PROGRAM = 32 * 32 * _WARPS
# Under PDL, weights up to this size are prefetched into L2 before the wait for the input. 16 MiB
# would take all of Qwen3-0.6B's projections (at most 12.6 MB) within an H100's or H200's 50 MB
# of L2 and none of Llama-3.1-8B's (33 to 235 MB), which would only evict each other. Off: on an
# H200 (2026-11-30) it made Qwen3-0.6B's batch-1 decode 0.6% faster with the decode settings of
# the day before, but 2.6% slower (992 against 1,019 tok/s) with the present ones (contexts split
# from 128 tokens, heads first, 2 stages); the benchmark's pdl_prefetch variant measures it again.
PREFETCH_MAX_BYTES = 0
_L2_LINE_BYTES = 128


def rows_routed(weight: torch.Tensor) -> int:
    """How many rows of input a projection with this weight sends to the kernel."""
    return 2 if weight.shape[0] <= MAX_FEATURES_FOR_TWO_ROWS else 1


@dataclass(frozen=True)
class SkinnyTile:
    """One program's share: ``block_n`` output features, ``block_k`` inner elements per loop step."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 4


@triton.jit
def _skinny_linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    residual_ptr,
    norm_weight_ptr,
    residual_out_ptr,
    scale_ptr,
    zero_ptr,
    rows,
    out_features,
    in_features,
    stride_x_row,
    stride_w_row,
    stride_y_row,
    stride_residual_row,
    stride_scale_row,
    stride_zero_row,
    eps,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    NORMED: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ROWS_P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    SCALED: tl.constexpr = 0,
    SCALE_ROWS: tl.constexpr = 1,
    SCALE_COLUMNS: tl.constexpr = 1,
    HAS_ZERO: tl.constexpr = False,
    PACKED: tl.constexpr = False,
    PDL: tl.constexpr = False,
    PREFETCH_LINES: tl.constexpr = 0,
    LINE_ELEMENTS: tl.constexpr = 64,
):
    """Grid ``(cdiv(out_features, BLOCK_N),)``: program ``p`` makes ``y[:, p*BLOCK_N:(p+1)*BLOCK_N]``.

    The input rows are ``x``, or are made from it as they are loaded, which saves the launch and
    the round trip through memory of the small op that would otherwise make them:
    - ``GATED``: ``silu(gate) * up`` of ``x = gate | up`` (``2 * in_features`` wide), rounded where
      the torch layer rounds, so the rows are the ones ``SiluAndMul`` would make;
    - ``NORMED``: ``norm_weight * rmsnorm(h)`` with ``h = x + residual`` (``HAS_RESIDUAL``) or
      ``x``. Every program sums ``h``'s squares along its own walk over the inner dimension and
      scales its outputs by the row's ``1 / rms`` at the end: the scale is one number per row, so
      it can come after the sum. Program 0 also stores ``h`` at ``residual_out``.

    ``SCALED`` > 0: ``w`` is low-bit (e4m3, int8, packed 4-bit), scaled per block
    (``layers/quantized.py``). 1: one scale per output row (``scale[f, 0]``), applied to the sums
    once at the end. 2: ``scale[i, j]`` multiplies the block of ``SCALE_ROWS`` x ``SCALE_COLUMNS``
    at (``i``, ``j``); each loaded weight tile is scaled, its scales gathered by block index.
    ``HAS_ZERO``: each block's zero point (int8, laid out as the scales) is taken from its values
    first. ``PACKED``: ``w`` is 4-bit integers packed eight to an int32 word along each row, the
    first in the lowest bits, each stored plus 8; each value is cut out of its word as the tile is
    loaded (a word read for 8 of the tile's columns).

    ``PREFETCH_LINES`` > 0 (with ``PDL`` only): before the wait, the program asks L2 for its weight
    rows, ``LINE_ELEMENTS`` to a 128-byte line, so they stream in while the previous kernel ends.
    """
    pid = tl.program_id(0)
    features = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    feature_mask = features < out_features
    if PREFETCH_LINES > 0:
        line_starts = tl.arange(0, PREFETCH_LINES) * LINE_ELEMENTS
        lines = w_ptr + features[:, None].to(tl.int64) * stride_w_row + line_starts[None, :]
        prefetch_to_l2(tl.where(feature_mask[:, None] & (line_starts < in_features)[None, :], lines, w_ptr))
    wait_for_previous_kernel(PDL)
    row_ids = tl.arange(0, ROWS_P2)
    row_mask = row_ids < rows
    ks = tl.arange(0, BLOCK_K)
    if PACKED:
        # BLOCK_K is a multiple of 8 and so is every step's start: a column's word and place in it
        # are the same in every step.
        w_ptrs = w_ptr + features[:, None].to(tl.int64) * stride_w_row + (ks // 8)[None, :]
        shifts = (ks % 8) * 4
    else:
        w_ptrs = w_ptr + features[:, None].to(tl.int64) * stride_w_row + ks[None, :]
    if HAS_ZERO and SCALED == 1:
        row_zero = tl.load(zero_ptr + features.to(tl.int64) * stride_zero_row, mask=feature_mask, other=0)
        row_zero = row_zero.to(tl.float32)
    x_ptrs = x_ptr + row_ids[:, None].to(tl.int64) * stride_x_row + ks[None, :]
    if HAS_RESIDUAL:
        residual_ptrs = residual_ptr + row_ids[:, None].to(tl.int64) * stride_residual_row + ks[None, :]
        residual_out_ptrs = residual_out_ptr + row_ids[:, None].to(tl.int64) * in_features + ks[None, :]
    # Products are summed along k once, after the loop. The first version summed across threads
    # in every step (with shorter steps too): at four rows it ran 1.6 to 2.7 times slower on an
    # H200 (Qwen3's qkv 14.3 against 8.8 us).
    products = tl.zeros([ROWS_P2, BLOCK_N, BLOCK_K], dtype=tl.float32)
    squares = tl.zeros([ROWS_P2, BLOCK_K], dtype=tl.float32)
    # Stages named on the loop: otherwise the compiler pipelines only loads that feed a dot, and
    # each step would wait for its weight tile before asking for the next.
    for k_start in tl.range(0, in_features, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            # The masks are constant along k, so the loads stay 16 bytes wide.
            w_mask = feature_mask[:, None]
            x_mask = row_mask[:, None]
        else:
            k_mask = (k_start + ks) < in_features
            w_mask = feature_mask[:, None] & k_mask[None, :]
            x_mask = row_mask[:, None] & k_mask[None, :]
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)
        if PACKED:
            w = ((w >> shifts[None, :]) & 15) - 8  # the arithmetic shift's sign bits masked off
        if GATED:
            up = tl.load(x_ptrs + in_features, mask=x_mask, other=0.0)
            gate = x.to(tl.float32)
            activated = (gate / (1.0 + tl.exp(-gate))).to(x.dtype)
            x = (activated.to(tl.float32) * up.to(tl.float32)).to(x.dtype)
        if NORMED:
            if HAS_RESIDUAL:
                residual = tl.load(residual_ptrs, mask=x_mask, other=0.0)
                # Rounded to the residual stream's dtype before the norm reads it, as torch does.
                x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
                if pid == 0:
                    tl.store(residual_out_ptrs, x, mask=x_mask)
                residual_ptrs += BLOCK_K
                residual_out_ptrs += BLOCK_K
            h = x.to(tl.float32)
            squares += h * h
            if EVEN_K:
                norm_weight = tl.load(norm_weight_ptr + k_start + ks)
            else:
                norm_weight = tl.load(norm_weight_ptr + k_start + ks, mask=k_mask, other=0.0)
            x32 = h * norm_weight.to(tl.float32)[None, :]
        else:
            x32 = x.to(tl.float32)
        w32 = w.to(tl.float32)
        if SCALED == 2:
            block_rows = (features // SCALE_ROWS)[:, None].to(tl.int64)
            block_columns = ((k_start + ks) // SCALE_COLUMNS)[None, :]
            if HAS_ZERO:
                zero_ptrs = zero_ptr + block_rows * stride_zero_row + block_columns
                w32 -= tl.load(zero_ptrs, mask=w_mask, other=0).to(tl.float32)
            w32 *= tl.load(scale_ptr + block_rows * stride_scale_row + block_columns, mask=w_mask, other=0.0)
        elif HAS_ZERO:
            w32 -= row_zero[:, None]
        products += x32[:, None, :] * w32[None, :, :]
        w_ptrs += BLOCK_K // 8 if PACKED else BLOCK_K
        x_ptrs += BLOCK_K
    acc = tl.sum(products, axis=2)
    if SCALED == 1:
        row_scale = tl.load(
            scale_ptr + features.to(tl.int64) * stride_scale_row, mask=feature_mask, other=0.0
        )
        acc *= row_scale[None, :]
    if NORMED:
        acc *= tl.rsqrt(tl.sum(squares, axis=1) / in_features + eps)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + features, mask=feature_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + row_ids[:, None].to(tl.int64) * stride_y_row + features[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & feature_mask[None, :])


def default_tile(rows: int, in_features: int) -> SkinnyTile:
    """The measured tile for one or two rows; with more, shorter inner steps keep the products
    within the registers (steps: ``_inner_step``)."""
    block_k = min(_PRODUCTS_PER_PROGRAM // (_BLOCK_N * triton.next_power_of_2(rows)), _MAX_BLOCK_K)
    return SkinnyTile(block_n=_BLOCK_N, block_k=_inner_step(block_k, in_features), num_warps=_WARPS)


def default_fused_tile(rows: int, in_features: int) -> SkinnyTile:
    """The tile of a matmul that makes its input on load (the norm or SiLU-and-mul): at one row
    and two (all the decoder sends it), 8 features a program, 512 inner elements a step. On an
    H200 (benchmarks/gpu.py's fused_input_sweep, 2026-11-30) it was the fastest of the tiles tried
    for every Qwen3-0.6B and Llama-3.1-8B projection but one, by up to 9 us against the plain
    tile, and within 0.13 us of the fastest there. More rows keep default_tile's products."""
    if rows > 2:
        return default_tile(rows, in_features)
    return SkinnyTile(
        block_n=_FUSED_BLOCK_N, block_k=_inner_step(_FUSED_BLOCK_K, in_features), num_warps=_WARPS
    )


def _inner_step(cap: int, in_features: int) -> int:
    """Inner elements a loop step, at most ``cap``: a power of two that divides the inner
    dimension where one does (16 at least), so the loads need no mask along it and stay wide."""
    return min(cap, max(in_features & -in_features, 16))


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tile: SkinnyTile | None = None,
    scale: WeightScale | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias`` for a 2-D ``x`` of at most ``KERNEL_MAX_ROWS`` rows, in ``x``'s dtype.
    With ``scale``, ``weight`` is low-bit and read as it says (``linear_operands.WeightScale``:
    e4m3, int8 or packed 4-bit values, their zero points and scales); so for every function here."""
    _check_operands(x, weight, bias, inner_width=1, scale=scale)
    return _launch(x, weight, bias, tile, scale=scale)


def skinny_silu_linear(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tile: SkinnyTile | None = None,
    scale: WeightScale | None = None,
) -> torch.Tensor:
    """``silu_and_mul(gate_up) @ weight.T + bias`` in one kernel: ``gate_up`` is ``[rows, 2 * in]``,
    the gate half first (the MLP's down projection of its gate|up projection's output)."""
    _check_operands(gate_up, weight, bias, inner_width=2, scale=scale)
    return _launch(gate_up, weight, bias, tile, gated=True, scale=scale)


def skinny_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tile: SkinnyTile | None = None,
    scale: WeightScale | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm_weight * rmsnorm(h)) @ weight.T + bias`` in one kernel, with ``h = x + residual``
    (or ``x`` when ``residual`` is None); returns it and ``h``, the residual stream the next layer
    adds to, as ``RMSNorm`` called with a residual does."""
    _check_operands(x, weight, bias, inner_width=1, scale=scale)
    if norm_weight.shape != (x.shape[1],) or norm_weight.device != x.device:
        raise ValueError(f"norm weight {tuple(norm_weight.shape)} on {norm_weight.device} must have "
                         f"{x.shape[1]} entries on {x.device}")  # fmt: skip
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):  # fmt: skip
        raise ValueError(f"residual ({tuple(residual.shape)}, {residual.dtype}, {residual.device}) must "
                         f"match x ({tuple(x.shape)}, {x.dtype}, {x.device})")  # fmt: skip
    residual_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x
    y = _launch(x, weight, bias, tile, norm=(norm_weight, eps, residual, residual_out), scale=scale)
    if residual is not None and weight.shape[0] == 0:  # no program ran to store the stream
        torch.add(x, residual, out=residual_out)
    return y, residual_out


def _check_operands(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inner_width: int,
    scale: WeightScale | None,
) -> None:
    check_linear_operands(x, weight, bias, inner_width, scale)
    if x.shape[0] > KERNEL_MAX_ROWS:
        raise ValueError(f"{x.shape[0]} rows: the skinny matmul takes at most {KERNEL_MAX_ROWS}")


# A norm made on load: its weight, epsilon, the residual added first (or None), where ``h`` goes.
_NormOnLoad = tuple[torch.Tensor, float, torch.Tensor | None, torch.Tensor]


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tile: SkinnyTile | None,
    gated: bool = False,
    norm: _NormOnLoad | None = None,
    scale: WeightScale | None = None,
) -> torch.Tensor:
    rows = x.shape[0]
    out_features = weight.shape[0]
    in_features = scale.in_features(weight) if scale is not None else weight.shape[1]
    packed = scale is not None and scale.columns is not None
    y = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    if rows == 0 or out_features == 0:
        return y
    x, weight = unit_inner_stride(x), unit_inner_stride(weight)
    bias = unit_inner_stride(bias) if bias is not None else None  # read as contiguous
    norm_weight, eps, residual, residual_out = norm if norm is not None else (weight, 0.0, None, y)
    norm_weight = unit_inner_stride(norm_weight)
    residual = unit_inner_stride(residual) if residual is not None else None
    fused = gated or norm is not None
    tile = tile or (default_fused_tile(rows, in_features) if fused else default_tile(rows, in_features))
    if packed and tile.block_k % 8:
        raise ValueError(
            f"packed 4-bit weights take inner steps of whole words (8 values), not {tile.block_k}"
        )
    scales = unit_inner_stride(scale.scale) if scale is not None else y
    zeros = unit_inner_stride(scale.zero_point) if scale is not None and scale.zero_point is not None else y
    scale_rows, scale_columns = scale.block if scale is not None else (1, 1)
    per_row = scale_rows == 1 and scale_columns >= in_features
    scaled = 0 if scale is None else 1 if per_row else 2
    _skinny_linear_kernel[(triton.cdiv(out_features, tile.block_n),)](
        x, weight, bias if bias is not None else weight, y,
        residual if residual is not None else x, norm_weight, residual_out, scales, zeros,
        rows, out_features, in_features, x.stride(0), weight.stride(0), y.stride(0),
        residual.stride(0) if residual is not None else 0, scales.stride(0), zeros.stride(0), eps,
        HAS_BIAS=bias is not None,
        GATED=gated,
        NORMED=norm is not None,
        HAS_RESIDUAL=residual is not None,
        ROWS_P2=triton.next_power_of_2(rows),
        BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k,
        EVEN_K=in_features % tile.block_k == 0,
        NUM_STAGES=tile.num_stages,
        SCALED=scaled,
        SCALE_ROWS=scale_rows if scaled == 2 else 1,
        SCALE_COLUMNS=scale_columns if scaled == 2 else 1,
        HAS_ZERO=zeros is not y,
        PACKED=packed,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
        **launch_options(),
        **(_prefetch_options(weight) if not packed else {}),
    )  # fmt: skip
    return y


def _prefetch_options(weight: torch.Tensor) -> dict[str, int]:
    """The launch's L2 prefetch before its wait: every line of each weight row under PDL, for a
    weight that fits well within L2; none otherwise (the kernel's defaults)."""
    size = weight.element_size()
    if not triton_pdl.enabled() or weight.numel() * size > PREFETCH_MAX_BYTES:
        return {}
    lines = triton.next_power_of_2(triton.cdiv(weight.shape[1] * size, _L2_LINE_BYTES))
    return {"PREFETCH_LINES": lines, "LINE_ELEMENTS": _L2_LINE_BYTES // size}
