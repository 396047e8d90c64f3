"""The operand checks the Triton matmuls share (``triton_linear.py``, ``triton_tiled_linear.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn


@dataclass(frozen=True)
class WeightScale:
    """How to read a low-bit weight (``layers/quantized.py``): ``scale[i, j]`` multiplies the
    weight's block of ``block`` (rows, columns) at block row ``i`` and block column ``j``, after
    ``zero_point[i, j]`` (when there is one) is taken from its values. The weight is e4m3 or int8
    ``[out, in]``, or, with ``columns`` set, 4-bit integers packed eight to an int32 word along
    each row (``[out, ceil(columns / 8)]``, each stored plus 8; ``columns`` is ``in``)."""

    scale: torch.Tensor
    block: tuple[int, int]
    zero_point: torch.Tensor | None = None
    columns: int | None = None

    def in_features(self, weight: torch.Tensor) -> int:
        return self.columns if self.columns is not None else weight.shape[1]


def check_linear_operands(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inner_width: int = 1,
    scale: WeightScale | None = None,
) -> None:
    """``x`` must be ``[rows, inner_width * in]`` for a ``[out, in]`` weight, the bias ``[out]``,
    and all one floating-point type on one device, as ``F.linear`` requires: the kernels would
    read mixed inputs as their own types. With ``scale``, the weight is low-bit instead (see
    ``WeightScale``), its scales float32 and one per block."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != inner_width * _in_features(weight, scale):
        width = "in" if inner_width == 1 else f"{inner_width} * in"
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must be "
                         f"[rows, {width}], [out, in]")  # fmt: skip
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} must have {weight.shape[0]} entries")
    same_type = [bias] if bias is not None else []
    if scale is None:
        same_type.append(weight)
    else:
        _check_scale(weight, scale, x.device)
    for other in same_type:
        if other.dtype != x.dtype or other.device != x.device:
            raise ValueError(f"x ({x.dtype}, {x.device}) and its weight and bias "
                             f"({other.dtype}, {other.device}) must share a dtype and device")  # fmt: skip
    if not x.dtype.is_floating_point:
        raise ValueError(f"the Triton matmuls take floating-point inputs, not {x.dtype}")


def _in_features(weight: torch.Tensor, scale: WeightScale | None) -> int:
    return scale.in_features(weight) if scale is not None else weight.shape[1]


def _check_scale(weight: torch.Tensor, scale: WeightScale, device: torch.device) -> None:
    rows, columns = weight.shape[0], scale.in_features(weight)
    block_rows, block_columns = scale.block
    expected = (-(-rows // block_rows), -(-columns // block_columns))
    kinds = (torch.int32,) if scale.columns is not None else (FP8_DTYPE, torch.int8)
    if weight.dtype not in kinds or weight.device != device:
        raise ValueError(f"a scaled weight must be {' or '.join(map(str, kinds))} on {device}, not "
                         f"{weight.dtype} on {weight.device}")  # fmt: skip
    if scale.columns is not None and weight.shape[1] != -(-scale.columns // 8):
        raise ValueError(f"a packed weight of {scale.columns} columns has {-(-scale.columns // 8)} words "
                         f"a row, not {weight.shape[1]}")  # fmt: skip
    if scale.scale.dtype != torch.float32 or scale.scale.device != device or scale.scale.shape != expected:
        raise ValueError(f"the scales of a {tuple(weight.shape)} weight in blocks of {scale.block} must be "
                         f"float32 {expected} on {device}, not {scale.scale.dtype} "
                         f"{tuple(scale.scale.shape)} on {scale.scale.device}")  # fmt: skip
    zero = scale.zero_point
    if zero is not None and (zero.dtype != torch.int8 or zero.device != device or zero.shape != expected):
        raise ValueError(f"the zero points must be int8 {expected} on {device}, not {zero.dtype} "
                         f"{tuple(zero.shape)} on {zero.device}")  # fmt: skip


def unit_inner_stride(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when its last dimension is contiguous (the kernels read rows in place
    through their stride), else a contiguous copy."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()
