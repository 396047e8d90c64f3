"""8-bit float weights: a projection's ``weight`` in float8_e4m3fn and a float32 scale per block.

The weight a projection computes with is ``fp8 * scale``, each scale covering a ``block`` of
(rows, columns) of the weight: one output row (a per-channel scale) or a square block
(``quant_config.Fp8Scheme``). The fp8 tensor takes half the memory of a 16-bit one, and a decode
step of one or two sequences, which reads every weight once, reads half the bytes: the skinny
Triton matmul (``triton_linear.py``) scales the weights as it loads them. Other steps widen the
weight to the activations' dtype first and use the ordinary matmul.

``quantize`` makes such weights from a 16- or 32-bit matrix (the engine option ``quantization:
fp8``, and the tests' checkpoints).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from inferd.layers.linear_operands import FP8_DTYPE

if TYPE_CHECKING:
    from inferd.layers.linear import Linear

# The largest finite e4m3 value: a block's largest magnitude is scaled to it.
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """The [out, in] matrix ``weight * scale`` (each scale widened over its block) in ``dtype``;
    the product is taken in float32, so the only rounding is the final one to ``dtype``."""
    rows, columns = weight.shape
    block_rows, block_columns = block
    scale_rows, scale_columns = scale.shape
    # One float32 copy of the weight, scaled in place (a prompt step's peak memory holds it).
    widened = weight.to(torch.float32)
    if rows == scale_rows * block_rows and columns == scale_columns * block_columns:
        # Whole blocks: the scale broadcasts over a view, no widened copy of it.
        widened.view(scale_rows, block_rows, scale_columns, block_columns).mul_(scale[:, None, :, None])
    else:  # partial blocks at the edges: the scales widened and cut to the weight's shape
        widened.mul_(
            scale.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_columns, 1)[:, :columns]
        )
    return widened.to(dtype)


def quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] as fp8 and its float32 scales, one per ``block`` of (rows, columns):
    each block's largest magnitude becomes e4m3's largest value (an all-zero block gets scale 1)."""
    rows, columns = weight.shape
    block_rows, block_columns = block
    scale_rows, scale_columns = -(-rows // block_rows), -(-columns // block_columns)
    padded = torch.zeros(scale_rows * block_rows, scale_columns * block_columns, dtype=torch.float32,
                         device=weight.device)  # fmt: skip
    padded[:rows, :columns] = weight.to(torch.float32)
    tiled = padded.view(scale_rows, block_rows, scale_columns, block_columns)
    largest = tiled.abs().amax(dim=(1, 3))
    scale = torch.where(largest > 0, largest / FP8_MAX, torch.ones_like(largest))
    scaled = (tiled / scale[:, None, :, None]).view_as(padded)[:rows, :columns]
    return scaled.to(FP8_DTYPE), scale


def hold_fp8(linear: Linear, block: tuple[int, int], scale_shape: tuple[int, int]) -> None:
    """Give ``linear`` an fp8 ``weight`` and a float32 ``weight_scale`` of ``scale_shape`` (both
    to be filled, as a checkpoint's tensors fill them) in place of its weight; ``block`` is what
    one scale covers. The layer reads ``weight_block`` to know it holds such weights."""
    device = linear.weight.device
    linear.weight = nn.Parameter(torch.empty(linear.weight.shape, dtype=FP8_DTYPE, device=device),
                                 requires_grad=False)  # fmt: skip
    scale = torch.ones(scale_shape, dtype=torch.float32, device=device)
    linear.register_parameter("weight_scale", nn.Parameter(scale, requires_grad=False))
    linear.weight_block = block


def skinny_kernel_reads_fp8(device: torch.device) -> bool:
    """Whether the skinny Triton matmul can read 8-bit float weights on ``device``: Triton's
    e4m3 type needs compute capability 8.9 (Ada, Hopper) or later on a GPU; below it such
    projections widen their weights and use the ordinary matmul."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_in_place(linear: Linear, block: tuple[int, int]) -> None:
    """Replace ``linear``'s weight by its fp8 form and scales (``quantize``)."""
    with torch.no_grad():
        weight, scale = quantize(linear.weight.data, block)
        hold_fp8(linear, block, (scale.shape[0], scale.shape[1]))
        linear.weight.copy_(weight)
        linear.fp8_scale().copy_(scale)
