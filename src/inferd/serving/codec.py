"""Decoding and encoding tensor contents: JSON `data` (flat or nested) and raw little-endian bytes.

Raw layout (v2 gRPC `raw_*_contents`, Triton's binary tensor extension): the elements in row-major
order, little-endian; a BYTES element is a 4-byte little-endian length followed by its bytes; BF16 is
the upper half of the float32 bit pattern.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from inferd.serving.datatypes import numpy_dtype
from inferd.serving.errors import InvalidInputError


def element_count(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def _flatten(data: Any) -> list[Any]:
    """Flattens nested JSON lists; nesting only has to be consistent with the declared shape in total size."""
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            flat.append(item)
    return flat


_END = object()


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, which JSON's \ud800 escapes can spell
            raise InvalidInputError("BYTES elements must be valid text (a lone surrogate is not)") from None
    if isinstance(value, bytes):
        return value
    raise InvalidInputError(f"BYTES elements must be strings, got {type(value).__name__}")


def _check_json_element(datatype: str, value: Any) -> None:
    """JSON numbers are loose; reject values numpy would silently coerce (strings, floats for ints)."""
    if datatype == "BOOL":
        if not isinstance(value, bool):
            raise InvalidInputError(f"BOOL elements must be true/false, got {value!r}")
    elif datatype.startswith(("INT", "UINT")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInputError(f"{datatype} elements must be integers, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(f"{datatype} elements must be numbers, got {value!r}")


def array_from_json(datatype: str, shape: Sequence[int], data: Any) -> np.ndarray:
    """A tensor from the JSON `data` field, validated against `shape`."""
    flat = _flatten(data)
    expected = element_count(shape)
    if len(flat) != expected:
        raise InvalidInputError(f"shape {list(shape)} needs {expected} elements, got {len(flat)}")
    if datatype == "BYTES":
        array = np.empty(len(flat), dtype=object)
        array[:] = [_to_bytes(v) for v in flat]
        return _reshaped(array, shape)
    for value in flat:
        _check_json_element(datatype, value)
    try:
        array = np.asarray(flat, dtype=numpy_dtype(datatype))
    except OverflowError as exc:
        raise InvalidInputError(f"value out of range for {datatype}: {exc}") from None
    return _reshaped(array, shape)


def _reshaped(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``array`` in ``shape``, whose element count it already has: numpy still refuses more than
    64 dimensions, or dimensions beside a zero whose product passes its index type."""
    try:
        return array.reshape(shape)
    except (ValueError, OverflowError) as exc:
        raise InvalidInputError(f"shape {list(shape)} cannot be made: {exc}") from None


def array_to_json(datatype: str, array: np.ndarray) -> list[Any]:
    """The flat JSON `data` list; BYTES become text (undecodable bytes are replaced: use binary data)."""
    if datatype == "BYTES":
        return [_as_bytes(v).decode("utf-8", errors="replace") for v in array.reshape(-1)]
    return array.reshape(-1).tolist()


def _as_bytes(value: Any) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _bf16_from_raw(raw: bytes) -> np.ndarray:
    upper = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
    return (upper << 16).view(np.float32)


def _bf16_to_raw(array: np.ndarray) -> bytes:
    values = np.ascontiguousarray(array, dtype=np.float32)
    bits = values.view(np.uint32)
    # Round to nearest even, as hardware conversions do, instead of truncating.
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    # A NaN's payload can carry the rounding past the exponent (into -0.0): keep it a quiet NaN.
    rounded = np.where(np.isnan(values), (bits >> 16) | np.uint32(0x0040), rounded)
    return rounded.astype("<u2").tobytes()


def array_from_raw(datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    """A tensor from its raw byte encoding, validated against `shape`."""
    count = element_count(shape)
    if datatype == "BYTES":
        return _reshaped(_bytes_from_raw(raw, count), shape)
    if datatype == "BF16":
        if len(raw) != 2 * count:
            raise InvalidInputError(f"BF16 shape {list(shape)} needs {2 * count} bytes, got {len(raw)}")
        return _reshaped(_bf16_from_raw(raw), shape)
    dtype = numpy_dtype(datatype).newbyteorder("<")
    if len(raw) != dtype.itemsize * count:
        raise InvalidInputError(
            f"{datatype} shape {list(shape)} needs {dtype.itemsize * count} bytes, got {len(raw)}"
        )
    return _reshaped(np.frombuffer(raw, dtype=dtype).astype(numpy_dtype(datatype)), shape)


def _bytes_from_raw(raw: bytes, count: int) -> np.ndarray:
    # Each element has a 4-byte length prefix: a shape the bytes cannot fill is refused before the
    # array is allocated, so a small request cannot make the server allocate for a huge shape.
    if 4 * count > len(raw):
        raise InvalidInputError(f"BYTES raw contents of {len(raw)} bytes cannot hold {count} elements")
    elements = np.empty(count, dtype=object)
    offset = 0
    for index in range(count):
        if offset + 4 > len(raw):
            raise InvalidInputError("BYTES raw contents end inside a length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInputError("BYTES raw contents end inside an element")
        elements[index] = raw[offset : offset + length]
        offset += length
    if offset != len(raw):
        raise InvalidInputError(f"BYTES raw contents have {len(raw) - offset} bytes past {count} elements")
    return elements


def array_to_raw(datatype: str, array: np.ndarray) -> bytes:
    """The raw byte encoding of a tensor."""
    if datatype == "BYTES":
        parts = []
        for value in array.reshape(-1):
            data = _as_bytes(value)
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return b"".join(parts)
    if datatype == "BF16":
        return _bf16_to_raw(array)
    return np.ascontiguousarray(array, dtype=numpy_dtype(datatype).newbyteorder("<")).tobytes()
