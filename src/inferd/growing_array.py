"""A numpy array appended to in amortized constant time: a request's history kept between engine
steps and grown by the step's new tokens, never built again from the whole history."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class GrowingArray:
    def __init__(self, dtype: type) -> None:
        self._data: np.ndarray = np.empty(16, dtype=dtype)
        self.size = 0

    def append(self, value: int) -> None:
        if self.size == len(self._data):
            self._data = np.resize(self._data, 2 * len(self._data))
        self._data[self.size] = value
        self.size += 1

    def extend(self, values: Sequence[int] | np.ndarray) -> None:
        needed = self.size + len(values)
        if needed > len(self._data):
            self._data = np.resize(self._data, max(needed, 2 * len(self._data)))
        self._data[self.size : needed] = values
        self.size = needed

    def add_at(self, position: int, value: int) -> None:
        self._data[position] += value

    def view(self) -> np.ndarray:
        return self._data[: self.size]
