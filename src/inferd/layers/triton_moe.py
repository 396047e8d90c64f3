"""Routed experts on a Triton grouped matmul, without the host: ``models/moe.py``'s experts for
steps whose every shape is known before the step runs, so a decode step of a mixture of experts can
be captured as a CUDA graph and queued ahead under asynchronous scheduling.

The torch path asks the device how many tokens each expert has (one synchronisation a layer) and
runs one matmul pair per expert with work. Here the (token, expert) pairs are instead laid out on
the device, sorted by expert, with each expert's run padded to a multiple of ``block_m`` rows
(``align_pairs``), in a buffer sized for the worst case; a grid of one program per ``block_m``
rows and ``block_n`` output features then multiplies each block of rows by its expert's weights,
and blocks past the last expert's run return at once. Two launches make an expert's MLP: gate|up
over the tokens' hidden states, then (after SiLU-and-mul) down, which also scales each pair by its
routing weight; the ``top_k`` pair outputs of a token are then summed.

The engine uses it with the option ``triton_moe`` (off by default until a GPU has measured it).
This module imports triton at import time; import it only where triton is wanted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inferd.layers.activation import silu_and_mul

# tl.dot's smallest tile side.
_MIN_DOT = 16


# Rows per program, by how many pairs an expert gets on average (``block_rows``).
_BLOCK_ROWS = (16, 32, 64)


def block_rows(num_pairs: int, num_experts: int) -> int:
    """Rows per program: 16 while the pairs are few per expert (decode), up to 64 as they grow, so
    a program's weight tile serves as many rows as the expert has."""
    per_expert = max(num_pairs // num_experts, 1)
    return min(max(triton.next_power_of_2(per_expert), _BLOCK_ROWS[0]), _BLOCK_ROWS[-1])


def warm_up_token_counts(num_experts: int, top_k: int) -> tuple[int, ...]:
    """The fewest tokens of a step that make ``block_rows`` choose each of its sizes: one step of
    each compiles every variant of the kernel (the start-up warm-up runs them)."""
    counts = [1]
    for smaller in _BLOCK_ROWS[:-1]:
        # The first average past ``smaller`` pairs an expert, rounded up to whole tokens.
        counts.append(-(-(smaller + 1) * num_experts // top_k))
    return tuple(counts)


def align_pairs(experts: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs of ``experts`` ([tokens, top_k] expert indices) laid out for the grouped matmul:

    - ``pair_ids``: the pairs' flat indices (``token * top_k + j``) sorted by expert, each expert's
      run starting at a multiple of ``block_m``; padding holds ``tokens * top_k`` (no pair);
    - ``block_expert``: the expert of each block of ``block_m`` rows, -1 past the last run.

    Only device operations, with shapes that depend on the input's shape alone (no host read)."""
    flat = experts.reshape(-1)
    num_pairs = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    # A pair's place: its expert's padded start plus its rank among that expert's pairs.
    rank = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[sorted_experts]
    places = (padded_ends - padded)[sorted_experts] + rank
    # At most min(experts, pairs) runs, each padded by fewer than block_m rows.
    capacity = triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m
    pair_ids = torch.full((capacity,), num_pairs, dtype=torch.int64, device=device)
    pair_ids[places] = order
    block_starts = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(padded_ends, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return pair_ids, block_expert


# The pair counts vary with every step: specialising on them (a multiple of 16 or not) would
# compile variants no warm-up can foresee.
@triton.jit(do_not_specialize=["num_pairs", "rows_per_input"])
def _grouped_matmul_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    pair_ids_ptr,
    block_expert_ptr,
    pair_weights_ptr,
    num_pairs,
    out_features,
    in_features,
    rows_per_input,
    stride_x_row,
    stride_w_expert,
    stride_w_row,
    stride_out_row,
    SCALE_BY_WEIGHT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[pair] = x[pair // rows_per_input] @ w[expert].T (times the pair's routing weight)."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pair_ids_ptr + rows)
    valid = pairs < num_pairs
    inputs = pairs // rows_per_input
    features = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_base = w_ptr + expert.to(tl.int64) * stride_w_expert
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        inner = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            x_ptr + inputs[:, None] * stride_x_row + inner[None, :],
            mask=valid[:, None] & (inner[None, :] < in_features),
            other=0.0,
        )
        b = tl.load(
            w_base + features[None, :] * stride_w_row + inner[:, None],
            mask=(features[None, :] < out_features) & (inner[:, None] < in_features),
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    if SCALE_BY_WEIGHT:
        acc = acc * tl.load(pair_weights_ptr + pairs, mask=valid, other=0.0)[:, None]
    tl.store(
        out_ptr + pairs[:, None] * stride_out_row + features[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=valid[:, None] & (features[None, :] < out_features),
    )


def _grouped_matmul(
    x: torch.Tensor,
    weights: torch.Tensor,
    layout: tuple[torch.Tensor, torch.Tensor],
    num_pairs: int,
    rows_per_input: int,
    block_m: int,
    pair_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """[num_pairs, out] pair outputs: ``x``'s row ``pair // rows_per_input`` through the pair's
    expert's ``weights`` ([experts, out, in])."""
    pair_ids, block_expert = layout
    out_features, in_features = weights.shape[1], weights.shape[2]
    out = torch.empty(num_pairs, out_features, dtype=x.dtype, device=x.device)
    block_n, block_k = 64, 64
    grid = (block_expert.numel(), triton.cdiv(out_features, block_n))
    _grouped_matmul_kernel[grid](
        x,
        weights,
        out,
        pair_ids,
        block_expert,
        pair_weights if pair_weights is not None else out,
        num_pairs,
        out_features,
        in_features,
        rows_per_input,
        x.stride(0),
        weights.stride(0),
        weights.stride(1),
        out.stride(0),
        SCALE_BY_WEIGHT=pair_weights is not None,
        # float32 models keep float32 products (tf32 would round the inputs to 10 bits).
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out


def routed_experts(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
) -> torch.Tensor:
    """``sum_j weights[t, j] * expert[experts[t, j]](x[t])`` for every token ``t``, as
    ``models.moe.Experts.forward`` computes it, with no host read. ``gate_up``: [experts,
    2 * intermediate, hidden]; ``down``: [experts, hidden, intermediate]; both contiguous in their
    last dimension, as ``x`` is."""
    if gate_up.stride(-1) != 1 or down.stride(-1) != 1:
        raise ValueError("the experts' weights must be contiguous in their inner dimension")
    num_tokens, top_k = experts.shape
    num_experts = gate_up.shape[0]
    num_pairs = num_tokens * top_k
    block_m = block_rows(num_pairs, num_experts)
    layout = align_pairs(experts, num_experts, block_m)
    x = x.contiguous()
    hidden = silu_and_mul(_grouped_matmul(x, gate_up, layout, num_pairs, top_k, block_m))
    pair_weights = weights.reshape(-1).float().contiguous()
    outputs = _grouped_matmul(hidden, down, layout, num_pairs, 1, block_m, pair_weights)
    return outputs.view(num_tokens, top_k, -1).float().sum(dim=1).to(x.dtype)
