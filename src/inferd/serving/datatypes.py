"""The v2 protocol's tensor datatypes and how each maps onto numpy.

BF16 has no numpy dtype: such tensors are held as float32 arrays and only narrowed to 16 bits on the wire.
BYTES tensors are numpy object arrays of `bytes`.
"""

from __future__ import annotations

import numpy as np

_NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(np.float32),
    "BYTES": np.dtype(object),
}

DATATYPES: frozenset[str] = frozenset(_NUMPY_DTYPES)


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype that holds values of a v2 datatype in memory."""
    try:
        return _NUMPY_DTYPES[datatype]
    except KeyError:
        raise ValueError(f"unknown datatype {datatype!r}") from None
