"""The classification extension: an output requested with parameter `classification: k` comes back as
BYTES "score:index[:label]" strings for the k highest scores of each row, labels from the model config."""

from __future__ import annotations

import numpy as np

from inferd.serving.errors import InvalidInputError
from inferd.serving.tensor import ParameterValue


def top_k_count(value: ParameterValue) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"classification must be a positive integer, got {value!r}")
    return value


def classify(scores: np.ndarray, k: int, labels: tuple[str, ...], batched: bool) -> np.ndarray:
    """BYTES array of shape [rows, k] (or [k] when unbatched) over the last axis of `scores`."""
    if scores.dtype == np.dtype(object):
        raise InvalidInputError("classification needs a numeric output")
    rows = scores.reshape(scores.shape[0], -1) if batched else scores.reshape(1, -1)
    k = min(k, rows.shape[1])
    order = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    result = np.empty((rows.shape[0], k), dtype=object)
    for r, indices in enumerate(order):
        for c, index in enumerate(indices):
            text = f"{float(rows[r, index]):f}:{int(index)}"
            if index < len(labels):
                text += f":{labels[index]}"
            result[r, c] = text.encode("utf-8")
    return result if batched else result[0]
