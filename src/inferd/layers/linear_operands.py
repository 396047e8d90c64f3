"""The operand checks the Triton matmuls share (``triton_linear.py``, ``triton_tiled_linear.py``)."""

from __future__ import annotations

import torch


def check_linear_operands(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, inner_width: int = 1
) -> None:
    """``x`` must be ``[rows, inner_width * in]`` for a ``[out, in]`` weight, the bias ``[out]``,
    and all one floating-point type on one device, as ``F.linear`` requires: the kernels would
    read mixed inputs as their own types."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != inner_width * weight.shape[1]:
        width = "in" if inner_width == 1 else f"{inner_width} * in"
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must be "
                         f"[rows, {width}], [out, in]")  # fmt: skip
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} must have {weight.shape[0]} entries")
    for other in (weight, bias) if bias is not None else (weight,):
        if other.dtype != x.dtype or other.device != x.device:
            raise ValueError(f"x ({x.dtype}, {x.device}) and its weight and bias "
                             f"({other.dtype}, {other.device}) must share a dtype and device")  # fmt: skip
    if not x.dtype.is_floating_point:
        raise ValueError(f"the Triton matmuls take floating-point inputs, not {x.dtype}")


def unit_inner_stride(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when its last dimension is contiguous (the kernels read rows in place
    through their stride), else a contiguous copy."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()
