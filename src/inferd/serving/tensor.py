"""Protocol-neutral inference requests and responses shared by the REST and gRPC adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Parameter values allowed by the v2 protocol (InferParameter's oneof).
ParameterValue = bool | int | float | str
Parameters = dict[str, ParameterValue]


@dataclass
class Tensor:
    """A named tensor; `data` always has the dtype `datatypes.numpy_dtype(datatype)` and the given shape."""

    name: str
    datatype: str
    data: np.ndarray
    parameters: Parameters = field(default_factory=dict)

    @property
    def shape(self) -> list[int]:
        return [int(d) for d in self.data.shape]


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    parameters: Parameters = field(default_factory=dict)


@dataclass
class InferRequest:
    inputs: list[Tensor]
    outputs: list[RequestedOutput] = field(default_factory=list)
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[Tensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
