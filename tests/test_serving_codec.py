"""v2 tensor (de)coding: JSON flat and nested, raw bytes for every datatype, BYTES, FP16, BF16."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from inferd.serving.codec import array_from_json, array_from_raw, array_to_json, array_to_raw
from inferd.serving.datatypes import DATATYPES, numpy_dtype
from inferd.serving.errors import InvalidInputError

NUMERIC_SAMPLES = {
    "BOOL": [True, False, True, True, False, False],
    "UINT8": [0, 1, 2, 250, 254, 255],
    "UINT16": [0, 1, 2, 3, 65534, 65535],
    "UINT32": [0, 1, 2, 3, 4, 2**32 - 1],
    "UINT64": [0, 1, 2, 3, 4, 2**64 - 1],
    "INT8": [-128, -1, 0, 1, 2, 127],
    "INT16": [-32768, -1, 0, 1, 2, 32767],
    "INT32": [-(2**31), -1, 0, 1, 2, 2**31 - 1],
    "INT64": [-(2**63), -1, 0, 1, 2, 2**63 - 1],
    "FP16": [0.5, -1.0, 2.0, 1024.0, -0.25, 0.0],
    "FP32": [0.5, -1.5, 3.25, 1e10, -0.125, 0.0],
    "FP64": [0.1, -1.5, 3.25, 1e300, -0.125, 0.0],
    "BF16": [0.5, -1.0, 2.0, 1024.0, -0.25, 0.0],
}


def test_every_datatype_has_a_sample() -> None:
    assert set(NUMERIC_SAMPLES) | {"BYTES"} == DATATYPES


@pytest.mark.parametrize("datatype", sorted(NUMERIC_SAMPLES))
def test_json_and_raw_round_trip(datatype: str) -> None:
    values = NUMERIC_SAMPLES[datatype]
    array = array_from_json(datatype, [2, 3], values)
    assert array.shape == (2, 3) and array.dtype == numpy_dtype(datatype)
    assert array_to_json(datatype, array) == values
    raw = array_to_raw(datatype, array)
    np.testing.assert_array_equal(array_from_raw(datatype, [2, 3], raw), array)


def test_nested_json_equals_flat_json() -> None:
    nested = array_from_json("INT32", [2, 2], [[1, 2], [3, 4]])
    flat = array_from_json("INT32", [2, 2], [1, 2, 3, 4])
    np.testing.assert_array_equal(nested, flat)


def test_raw_layout_is_little_endian() -> None:
    assert array_to_raw("INT32", np.array([1], dtype=np.int32)) == b"\x01\x00\x00\x00"
    assert array_to_raw("FP16", np.array([1.0], dtype=np.float16)) == struct.pack("<e", 1.0)


def test_bf16_raw_is_upper_half_of_fp32_rounded_to_nearest_even() -> None:
    assert array_to_raw("BF16", np.array([1.0], dtype=np.float32)) == b"\x80\x3f"
    # 1 + 2^-8 lies exactly between two bf16 values; the even one (1.0) wins.
    assert array_to_raw("BF16", np.array([1.00390625], dtype=np.float32)) == b"\x80\x3f"
    np.testing.assert_array_equal(array_from_raw("BF16", [1], b"\x40\x40"), np.array([3.0], dtype=np.float32))


def test_bf16_raw_keeps_every_nan_a_nan() -> None:
    # Payloads whose rounding would carry past the exponent (into -0.0 or +0.0) included.
    bits = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800001, 0xFF800001], dtype=np.uint32)
    decoded = array_from_raw("BF16", [5], array_to_raw("BF16", bits.view(np.float32)))
    assert np.isnan(decoded).all()
    signs = array_from_raw("BF16", [2], array_to_raw("BF16", np.array([np.inf, -np.inf], dtype=np.float32)))
    np.testing.assert_array_equal(signs, np.array([np.inf, -np.inf], dtype=np.float32))


def test_bytes_json_and_raw() -> None:
    array = array_from_json("BYTES", [2], ["héllo", ""])
    assert list(array) == ["héllo".encode(), b""]
    raw = array_to_raw("BYTES", array)
    assert raw == struct.pack("<I", 6) + "héllo".encode() + struct.pack("<I", 0)
    assert list(array_from_raw("BYTES", [2], raw)) == list(array)
    assert array_to_json("BYTES", array) == ["héllo", ""]


@pytest.mark.parametrize(
    ("datatype", "shape", "data"),
    [
        ("FP32", [2, 2], [1.0, 2.0, 3.0]),
        ("INT32", [1], [1.5]),
        ("INT32", [1], ["1"]),
        ("BOOL", [1], [1]),
        ("FP32", [1], ["x"]),
        ("UINT8", [1], [256]),
        ("BYTES", [1], [3]),
        # Shapes numpy cannot make, though the element count matches: a 500 before.
        ("FP32", [1] * 65, [1.0]),
        ("BYTES", [0, 2**62, 2**62], []),
        ("INT32", [0, 10**30], []),
    ],
)
def test_invalid_json_data_is_rejected(datatype: str, shape: list[int], data: list[object]) -> None:
    with pytest.raises(InvalidInputError):
        array_from_json(datatype, shape, data)


@pytest.mark.parametrize(
    ("datatype", "shape", "raw"),
    [
        ("FP32", [2], b"\x00" * 7),
        ("BF16", [2], b"\x00" * 3),
        ("BYTES", [1], b"\x05\x00\x00\x00abc"),
        ("BYTES", [1], b"\x01\x00"),
        ("BYTES", [1], b"\x01\x00\x00\x00ab"),
        # A shape the 4-byte length prefixes cannot fill: refused before any array is allocated.
        ("BYTES", [10**12], b"abcd"),
        ("FP32", [0, 2**62, 2**62], b""),
        ("BF16", [1] * 65, b"\x00\x00"),
        ("BYTES", [1] * 65, b"\x01\x00\x00\x00a"),
    ],
)
def test_invalid_raw_data_is_rejected(datatype: str, shape: list[int], raw: bytes) -> None:
    with pytest.raises(InvalidInputError):
        array_from_raw(datatype, shape, raw)
