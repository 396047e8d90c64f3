"""Low-bit weights: a projection's ``weight`` in float8_e4m3fn, int8, or 4-bit integers packed
eight to an int32 word, and a float32 scale (and, for asymmetric 4-bit ones, a zero point) per block.

The weight a projection computes with is ``(values - zero_point) * scale``, each scale covering a
``block`` of (rows, columns) of the weight: one output row (a per-channel scale), a group of input
columns or a square block (``quant_config.QuantScheme``). An 8-bit tensor takes half the memory of
a 16-bit one, packed 4-bit words a quarter (they stay as the checkpoint packs them; 8-bit packed
ones are unpacked at load, ``unpack_int32``), and a decode step of one or two sequences, which
reads every weight once, reads that many bytes: the skinny Triton matmul (``triton_linear.py``)
unpacks and scales the weights as it loads them. Other steps widen the weight to the
activations' dtype first (``dequantize``) and use the ordinary matmul.

``quantize`` makes such weights from a 16- or 32-bit matrix (the engine option ``quantization:
fp8``, random weights in a checkpoint's shape, and the tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from inferd.layers.linear_operands import FP8_DTYPE, WeightScale

if TYPE_CHECKING:
    from inferd.layers.linear import Linear

# The largest finite e4m3 value: a block's largest magnitude is scaled to it.
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
# The largest magnitude of each kind of value, and what holds it once loaded.
_LARGEST = {"fp8": FP8_MAX, "int8": 127.0, "int4": 7.0}


def storage_dtype(values: str, packed: bool = False) -> torch.dtype:
    """What a projection of ``values`` ("fp8", "int8", "int4") holds: e4m3, int8, or for 4-bit
    integers that come ``packed``, the int32 words they come in (a quarter of a 16-bit weight)."""
    if values == "fp8":
        return FP8_DTYPE
    return torch.int32 if values == "int4" and packed else torch.int8


# Packed weights of at least this many values are unpacked field by field on the CPU (``unpack_int32``).
_FIELD_BY_FIELD_MIN_VALUES = 1 << 20


def unpack_int32(words: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """compressed-tensors' packed integers as int8 ``[rows, columns]``: each row's values packed
    ``32 // bits`` to an int32 word, the first in the lowest bits, each stored plus
    ``2 ** (bits - 1)`` (so 4-bit -8..7 as 0..15)."""
    per_word = 32 // bits
    if words.dtype != torch.int32 or words.dim() != 2 or words.shape[1] != -(-columns // per_word):
        raise ValueError(f"packed words {tuple(words.shape)} of {words.dtype} do not hold rows of {columns} "
                         f"{bits}-bit values ({-(-columns // per_word)} int32 words each)")  # fmt: skip
    mask, offset = (1 << bits) - 1, 1 << (bits - 1)
    if words.device.type != "cpu" or words.numel() * per_word < _FIELD_BY_FIELD_MIN_VALUES:
        # One shift of every word by every field's offset: the fewest ops (launches on a GPU).
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
        # The arithmetic shift's sign bits are masked off.
        values = ((words[:, :, None] >> shifts) & mask) - offset
        return values.reshape(words.shape[0], -1)[:, :columns].to(torch.int8)
    # Field by field into bytes: no int32 copy of the whole weight, which on the CPU costs more than
    # the extra ops from a million values on (4096 x 4096: 5.5 ms against 65). The offset is taken
    # once, in uint8, whose wrap-around leaves the signed value's bits.
    fields = torch.empty(*words.shape, per_word, dtype=torch.uint8, device=words.device)
    for k in range(per_word):
        fields[:, :, k] = (words >> (bits * k)) & mask
    unpacked = fields.sub_(offset).view(torch.int8).view(words.shape[0], -1)
    return unpacked if unpacked.shape[1] == columns else unpacked[:, :columns].contiguous()


def unpack_int32_rows(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """``unpack_int32`` of values packed down the columns (zero points: along the output rows)."""
    return unpack_int32(words.t(), bits, rows).t().contiguous()


def dequantize(weight: torch.Tensor, how: WeightScale, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] matrix ``(values - zero_point) * scale`` (each widened over its block) in
    ``dtype``, the values unpacked first where they are packed; taken in float32, so the only
    rounding is the final one to ``dtype``."""
    values = unpack_int32(weight, 4, how.columns) if how.columns is not None else weight
    # One float32 copy of the weight, shifted and scaled in place (a prompt step's peak memory
    # holds it).
    widened = values.to(torch.float32)
    if how.zero_point is not None:
        _apply_per_block(widened, how.zero_point, how.block, torch.Tensor.sub_)
    _apply_per_block(widened, how.scale, how.block, torch.Tensor.mul_)
    return widened.to(dtype)


def _apply_per_block(
    target: torch.Tensor,
    per_block: torch.Tensor,
    block: tuple[int, int],
    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    """``op(target, value of each element's block)`` in place: over whole blocks the values
    broadcast over a view; partial blocks at the edges take them widened and cut to shape."""
    rows, columns = target.shape
    block_rows, block_columns = block
    blocks_down, blocks_across = per_block.shape
    if rows == blocks_down * block_rows and columns == blocks_across * block_columns:
        tiled = target.view(blocks_down, block_rows, blocks_across, block_columns)
        op(tiled, per_block[:, None, :, None].to(target.dtype))
    else:
        widened = per_block.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_columns, 1)
        op(target, widened[:, :columns].to(target.dtype))


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``unpack_int32``'s inverse: each row's ``bits``-bit values, each plus ``2 ** (bits - 1)``,
    packed ``32 // bits`` to an int32 word, the first in the lowest bits (the last word of a row
    padded with zeros). Built field by field in int32 (a GPTQ or AWQ checkpoint's projections are
    packed again at load): the last field, whose top bit is the word's sign bit, is shifted as a
    signed field, so no sum leaves int32."""
    per_word, offset = 32 // bits, 1 << (bits - 1)
    rows, columns = values.shape
    padding = -columns % per_word
    if padding:  # stored as 0: the value -offset
        values = torch.nn.functional.pad(values, (0, padding), value=-offset)
    fields = values.view(rows, -1, per_word)
    last = fields[:, :, -1].to(torch.int32) + offset
    words = torch.where(last >= offset, last - (1 << bits), last) << (32 - bits)
    for k in range(per_word - 1):
        words += (fields[:, :, k].to(torch.int32) + offset) << (bits * k)
    return words


def quantize(
    weight: torch.Tensor, block: tuple[int, int], values: str = "fp8"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] as ``values`` ("fp8", "int8", "int4"; see ``storage_dtype``) and its
    float32 scales, one per ``block`` of (rows, columns): each block's largest magnitude becomes
    the largest value (an all-zero block gets scale 1); integers are rounded to the nearest."""
    rows, columns = weight.shape
    block_rows, block_columns = block
    scale_rows, scale_columns = -(-rows // block_rows), -(-columns // block_columns)
    padded = torch.zeros(scale_rows * block_rows, scale_columns * block_columns, dtype=torch.float32,
                         device=weight.device)  # fmt: skip
    padded[:rows, :columns] = weight.to(torch.float32)
    tiled = padded.view(scale_rows, block_rows, scale_columns, block_columns)
    largest = tiled.abs().amax(dim=(1, 3))
    scale = torch.where(largest > 0, largest / _LARGEST[values], torch.ones_like(largest))
    scaled = (tiled / scale[:, None, :, None]).view_as(padded)[:rows, :columns]
    if values != "fp8":
        scaled = scaled.round().clamp(-_LARGEST[values], _LARGEST[values])
    return scaled.to(storage_dtype(values)), scale


def hold_quantized(
    linear: Linear,
    block: tuple[int, int],
    scale_shape: tuple[int, int],
    dtype: torch.dtype = FP8_DTYPE,
    zero_points: bool = False,
) -> None:
    """Give ``linear`` a ``weight`` of ``dtype`` and a float32 ``weight_scale`` of ``scale_shape``
    (both to be filled, as a checkpoint's tensors fill them) in place of its weight; ``block`` is
    what one scale covers. ``dtype`` e4m3 or int8 holds ``[out, in]`` values; int32 holds 4-bit
    integers packed eight to a word (``pack_int32``), ``[out, ceil(in / 8)]``. The layer reads
    ``weight_block`` to know it holds such weights. With ``zero_points``, an int8
    ``weight_zero_point`` of the scales' shape too (``fold_zero_points`` takes it into int8
    values; packed values keep it)."""
    device = linear.weight.device
    shape = (
        (linear.out_features, -(-linear.in_features // 8)) if dtype == torch.int32 else linear.weight.shape
    )
    linear.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    scale = torch.ones(scale_shape, dtype=torch.float32, device=device)
    linear.register_parameter("weight_scale", nn.Parameter(scale, requires_grad=False))
    if zero_points:
        zero = torch.zeros(scale_shape, dtype=torch.int8, device=device)
        linear.register_parameter("weight_zero_point", nn.Parameter(zero, requires_grad=False))
    linear.weight_block = block


def spans_whole_blocks(start: int, count: int, rows: int, block_rows: int) -> bool:
    """Whether rows ``start`` to ``start + count`` of a weight of ``rows`` rows cover whole blocks
    of ``block_rows`` rows (the last may be partial where the weight ends), so that their own
    scales, and only theirs, cover them."""
    return start % block_rows == 0 and (count % block_rows == 0 or start + count == rows)


def fold_zero_points(linear: Linear) -> None:
    """Hold ``values - zero_point`` as the weight's values (in int8: 4-bit values and zero points
    differ by at most 15) and drop the zero points, so every path computes ``values * scale``."""
    if linear.weight.dtype != torch.int8:  # packed values keep theirs: the difference needs 5 bits
        return
    zero = linear._parameters.pop("weight_zero_point", None)
    if zero is None or linear.weight_block is None:
        return
    with torch.no_grad():
        values = linear.weight.to(torch.int16)
        _apply_per_block(values, zero, linear.weight_block, torch.Tensor.sub_)
        linear.weight.copy_(values.to(torch.int8))


def skinny_kernel_reads(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the skinny Triton matmul can read weights of ``dtype`` on ``device``: Triton's e4m3
    type needs compute capability 8.9 (Ada, Hopper) or later on a GPU; below it 8-bit float
    projections widen their weights and use the ordinary matmul. Every other weight it reads."""
    if dtype != FP8_DTYPE or device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_in_place(
    linear: Linear,
    block: tuple[int, int],
    values: str = "fp8",
    packed: bool = False,
    zero_points: bool = False,
) -> None:
    """Replace ``linear``'s weight by its ``values`` form and scales (``quantize``), 4-bit values
    ``packed`` into int32 words; with ``zero_points``, zero points of 0 beside packed values (the
    layout of an asymmetric checkpoint, whose matmuls read them)."""
    with torch.no_grad():
        weight, scale = quantize(linear.weight.data, block, values)
        if packed and values == "int4":
            weight = pack_int32(weight, 4)
        hold_quantized(
            linear,
            block,
            (scale.shape[0], scale.shape[1]),
            weight.dtype,
            zero_points and weight.dtype == torch.int32,
        )
        linear.weight.copy_(weight)
        linear.quant_scale().copy_(scale)
