"""A Triton tensor-core matmul for projections of a few dozen rows: ``x @ weight.T (+ bias)``.

A decode step of a few to 256 sequences still reads each projection's whole weight for little
arithmetic, so its time is the weight read, best spread over every multiprocessor. In the batch-64
profile of Qwen3-0.6B on an H200 (``benchmarks/results/nvidia-h200-session-start.json``, the eager
variant's ``profile_batch64``), cuBLAS's decode kernels took 24 us a layer for the four
projections' 31 MB of weights (1.3 TB/s, against 4 TB/s for a copy), with tiles of 8 to 64 output
features and a split-K pass. Here a program owns a narrow band of output features (``BLOCK_N``,
32 by default: 128 programs for 4,096 features) for up to ``BLOCK_M`` rows and walks the whole
inner dimension with pipelined loads, so no second pass adds up partial sums. Programs that share
a band of features run one after another (the row blocks are the grid's fast axis), so a weight
larger than the L2 cache is read from memory once even when the rows need several blocks.

Narrow outputs (1,024 features: Qwen3's o and down projections) would leave most
multiprocessors idle without splitting the inner dimension, so the layer routes only outputs of at
least ``MIN_FEATURES`` here (``rows_routed``), and only rows the skinny matmul does not take: with
it on, 2 to 256 rows of a wide projection (it takes one row of those). The layer uses this kernel
only with the engine option ``triton_tiled_linear``, off by default: on an H200 it gained nothing
over cuBLAS beyond the workload's run-to-run spread.

The launch grid depends on shapes only, so the op can be captured in a CUDA graph. This module
imports triton at import time; import it only where triton is wanted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from inferd.layers.linear_operands import check_linear_operands, unit_inner_stride
from inferd.layers.triton_pdl import launch_options, wait_for_previous_kernel

# The most rows routed here: past them a step is long and cuBLAS's wide tiles reuse the weights.
MAX_ROWS = 256
# The fewest output features routed here: 128 programs of 32 features, about one per multiprocessor.
MIN_FEATURES = 4096
# tl.dot's smallest tile side.
_MIN_DOT = 16


def rows_routed(weight: torch.Tensor) -> int:
    """How many rows of input a projection with this weight may send to the kernel (0: none)."""
    return MAX_ROWS if weight.shape[0] >= MIN_FEATURES else 0


@dataclass(frozen=True)
class TiledTile:
    """One program's share: up to ``block_m`` rows by ``block_n`` features, ``block_k`` inner
    elements per loop step."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4


def default_tile(rows: int) -> TiledTile:
    """Rows padded to tl.dot's 16 and up to 64 per program; 32 features and 128 inner elements,
    an 8 KB weight tile per step in half precision, four steps in flight."""
    block_m = min(max(triton.next_power_of_2(rows), _MIN_DOT), 64)
    return TiledTile(block_m=block_m, block_n=32, block_k=128)


@triton.jit
def _tiled_linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    rows,
    out_features,
    in_features,
    stride_x_row,
    stride_w_row,
    stride_y_row,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Grid ``(cdiv(rows, BLOCK_M), cdiv(out_features, BLOCK_N))``: program ``(m, n)`` makes the
    ``BLOCK_M x BLOCK_N`` block of ``y`` at rows ``m * BLOCK_M``, features ``n * BLOCK_N``."""
    wait_for_previous_kernel(PDL)
    row_ids = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    features = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = row_ids < rows
    feature_mask = features < out_features
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + row_ids[:, None].to(tl.int64) * stride_x_row + ks[None, :]
    # The weight tile is read as [k, features]: the transposed view tl.dot takes, no copy.
    w_ptrs = w_ptr + features[None, :].to(tl.int64) * stride_w_row + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in tl.range(0, in_features, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=feature_mask[None, :], other=0.0)
        else:
            k_mask = (k_start + ks) < in_features
            x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & feature_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + features, mask=feature_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + row_ids[:, None].to(tl.int64) * stride_y_row + features[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & feature_mask[None, :])


def tiled_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, tile: TiledTile | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` for a 2-D ``x`` in half precision or float32, in ``x``'s dtype."""
    check_linear_operands(x, weight, bias)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the tiled matmul takes float16, bfloat16 or float32 inputs, not {x.dtype}")
    rows, out_features = x.shape[0], weight.shape[0]
    y = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    if rows == 0 or out_features == 0:
        return y
    x, weight = unit_inner_stride(x), unit_inner_stride(weight)
    bias = unit_inner_stride(bias) if bias is not None else None
    tile = tile or default_tile(rows)
    grid = (triton.cdiv(rows, tile.block_m), triton.cdiv(out_features, tile.block_n))
    _tiled_linear_kernel[grid](
        x, weight, bias if bias is not None else weight, y,
        rows, out_features, x.shape[1], x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k,
        EVEN_K=x.shape[1] % tile.block_k == 0,
        NUM_STAGES=tile.num_stages,
        # float32 as F.linear computes it (no TF32); half precision multiplies exactly anyway.
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
        **launch_options(),
    )  # fmt: skip
    return y
