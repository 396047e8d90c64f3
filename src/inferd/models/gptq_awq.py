"""GPTQ's and AWQ's checkpoint tensors, turned as they load into the packed layout the engine holds.

Both formats store a projection's ``[out, in]`` weight as unsigned ``bits``-bit integers ``q``,
with a zero point ``z`` and a scale ``s`` per group of input columns (``group_size``; -1 is one
group across the whole input): ``weight[o, i] = (q[o, i] - z[g, o]) * s[g, o]`` where ``g`` is
input column ``i``'s group.
- ``qweight``: int32 words of ``32 // bits`` values, the first in the lowest bits. GPTQ packs them
  down the input, ``[in / per_word, out]``: word ``[i // per_word, o]`` holds ``q[o, i]``. AWQ
  packs eight output columns to a word, ``[in, out / 8]``, in the order 0 2 4 6 1 3 5 7.
- ``qzeros``: ``[groups, out / per_word]``, packed along the output as each format packs its
  weights. GPTQ's first format (``checkpoint_format`` "gptq") stores them minus one: GPTQModel,
  through which transformers reads GPTQ, subtracts one from every field of a word at once and adds
  it back so, so a zero point of 0 borrows from the field above; it is read here the same way.
- ``scales``: ``[groups, out]``, float16.
- ``g_idx`` (GPTQ): each input column's group: ``i // group_size``, unless the checkpoint was
  quantized in activation order (``desc_act``), where each group is some ``group_size`` columns
  anywhere along the input. Such a projection's columns are reordered at load so that its groups
  are runs again (``order_input_columns``), and it reorders its input the same way
  (``Linear.input_order``); the fused pieces of q|k|v and gate|up, which read one input, must
  share one order (GPTQ orders by the input's statistics, so theirs are the same).

The engine holds 4-bit weights as ``[out, in / 8]`` int32 words packed along the input, each value
stored as the signed value plus 8 (``layers/quantized.py``), with int8 zero points
``[out, groups]`` that are also signed: ``(q - 8) - (z - 8) = q - z``. A GPTQ ``qweight`` of 4 bits
is that layout transposed; 8-bit ones are held unpacked in int8. Symmetric GPTQ weights' zero
points are the middle of the range: they are checked and left out, so the matmuls skip them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from inferd.config import ModelLoadError
from inferd.layers import quantized
from inferd.layers.linear import Linear
from inferd.quant_config import PACKED_WEIGHT, ZERO_POINT, QuantScheme

# AWQ's order of eight output columns in a word: its k-th 4-bit field holds column AWQ_ORDER[k].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_FIELD_OF_COLUMN = [AWQ_ORDER.index(column) for column in range(8)]


def engine_tensors(
    name: str, tensor: torch.Tensor, scheme: QuantScheme, device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint tensor ``name`` as the tensors the loader fills (none for a symmetric weight's
    zero points, once checked, nor for a ``g_idx`` of consecutive groups; one in activation order
    is kept for ``order_input_columns``); tensors of other kinds as they are. Packed words are
    unpacked and packed again on ``device``, where the model is: a GPU does so in a fraction of the
    CPU's time."""
    module, _, kind = name.rpartition(".")
    if kind == "qweight":
        yield _weight(module, _words(tensor, name).to(device), scheme)
    elif kind == "qzeros":
        zeros = _zero_points(_words(tensor, name).to(device), scheme)
        if scheme.zero_points:
            yield f"{module}.{ZERO_POINT}", zeros
        elif zeros.any():
            middle = 1 << (scheme.bits - 1)
            stored = middle - scheme.zero_point_offset
            raise ModelLoadError(f"tensor {name!r}: a symmetric checkpoint's zero points must all be the "
                                 f"middle of the range ({middle}, stored as {stored})")  # fmt: skip
    elif kind == "scales":
        yield f"{module}.weight_scale", tensor.t().contiguous()
    elif kind == "g_idx" and scheme.input_order:
        if tensor.dim() != 1 or tensor.dtype not in (torch.int32, torch.int64):
            raise ModelLoadError(f"tensor {name!r} must be 1-D integers, not {tensor.dtype} "
                                 f"{tuple(tensor.shape)}")  # fmt: skip
        yield name, tensor.to(device=device, dtype=torch.int32)
    elif kind == "g_idx":
        _check_groups(tensor, name, scheme)
    else:
        yield name, tensor


def _words(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if tensor.dtype != torch.int32 or tensor.dim() != 2:
        raise ModelLoadError(f"tensor {name!r} must be 2-D int32 words, not {tensor.dtype} "
                             f"{tuple(tensor.shape)}")  # fmt: skip
    return tensor


def _weight(module: str, words: torch.Tensor, scheme: QuantScheme) -> tuple[str, torch.Tensor]:
    if scheme.method == "gptq" and scheme.bits == 4:
        # Packed down the input: transposed, each row's words hold its consecutive input columns.
        return f"{module}.{PACKED_WEIGHT}", words.t().contiguous()
    if scheme.method == "gptq":  # 8-bit: held unpacked
        return f"{module}.weight", _unpack(words.t().contiguous(), 8)
    # AWQ: [in, out] values, as [out, in] packed along the input.
    return f"{module}.{PACKED_WEIGHT}", quantized.pack_int32(_unpack(words, 4, awq_order=True).t(), 4)


def _zero_points(words: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The zero points, signed (minus the range's middle), as int8 ``[out, groups]``."""
    if scheme.zero_point_offset:
        # The offset added to every field of the word at once, carries running into the next field
        # (computed in int64 and wrapped to 32 bits).
        per_field = sum(1 << shift for shift in range(0, 32, scheme.bits)) * scheme.zero_point_offset
        wide = ((words.to(torch.int64) & 0xFFFFFFFF) + per_field) & 0xFFFFFFFF
        words = torch.where(wide >= 1 << 31, wide - (1 << 32), wide).to(torch.int32)
    return _unpack(words, scheme.bits, awq_order=scheme.method == "awq").t().contiguous()


def _unpack(words: torch.Tensor, bits: int, awq_order: bool = False) -> torch.Tensor:
    """Each row's words as their values minus the range's middle (``quantized.unpack_int32``),
    int8 ``[rows, words * 32 // bits]``, in column order (AWQ's fields put back in place)."""
    values = quantized.unpack_int32(words, bits, words.shape[1] * (32 // bits))
    if not awq_order:
        return values
    return values.view(words.shape[0], -1, 8)[:, :, _AWQ_FIELD_OF_COLUMN].reshape(words.shape[0], -1)


def _check_groups(g_idx: torch.Tensor, name: str, scheme: QuantScheme) -> None:
    columns = g_idx.shape[0] if g_idx.dim() == 1 else -1
    group = scheme.block[1] if scheme.block is not None else max(columns, 1)
    expected = torch.arange(columns, device=g_idx.device) // group if columns > 0 else None
    if expected is None or not torch.equal(g_idx.to(torch.int64), expected):
        raise ModelLoadError(f"tensor {name!r} puts input columns in groups out of order, but the config "
                             f"does not set desc_act")  # fmt: skip


def order_input_columns(linear: Linear, name: str) -> None:
    """Reorder the input columns of a projection loaded with a ``g_idx`` parameter (activation
    order) so that each group's are consecutive, and keep the order in ``input_order`` for its
    input; an order that is already so is dropped."""
    g_idx = linear._parameters.pop("g_idx", None)
    if g_idx is None or linear.weight_block is None:
        return
    groups = g_idx.to(torch.int64)
    order = torch.argsort(groups, stable=True)
    columns = linear.in_features
    expected = torch.arange(columns, device=groups.device) // linear.weight_block[1]
    if not torch.equal(groups[order], expected):
        raise ModelLoadError(f"{name}.g_idx does not give every group {linear.weight_block[1]} input columns")
    if torch.equal(order, torch.arange(columns, device=order.device)):
        return
    with torch.no_grad():
        if linear.weight.dtype == torch.int32:
            values = quantized.unpack_int32(linear.weight, 4, columns).index_select(1, order)
            linear.weight.copy_(quantized.pack_int32(values, 4))
        else:
            linear.weight.copy_(linear.weight.index_select(1, order))
    linear.input_order = order
