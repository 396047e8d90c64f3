"""Checks a request's tensors against the model's configured signature before anything runs."""

from __future__ import annotations

import numpy as np

from inferd.serving.classification import top_k_count
from inferd.serving.config import ModelConfig, TensorSpec
from inferd.serving.errors import InvalidInputError
from inferd.serving.tensor import InferRequest, Tensor


def _check_shape(config: ModelConfig, spec: TensorSpec, tensor: Tensor) -> None:
    expected = config.metadata_shape(spec)
    actual = tensor.shape
    fits = len(actual) == len(expected) and all(e in (-1, a) for e, a in zip(expected, actual, strict=True))
    if not fits:
        raise InvalidInputError(f"input {spec.name!r} has shape {actual}, the model expects {expected}")


def validated_inputs(config: ModelConfig, request: InferRequest) -> dict[str, np.ndarray]:
    """The request's input arrays by name, after checking names, datatypes, shapes and batch sizes."""
    given = {tensor.name: tensor for tensor in request.inputs}
    if len(given) != len(request.inputs):
        raise InvalidInputError("duplicate input names")
    expected_names = {spec.name for spec in config.inputs}
    unknown = sorted(set(given) - expected_names)
    if unknown:
        raise InvalidInputError(f"unknown inputs {unknown}; the model takes {sorted(expected_names)}")
    arrays: dict[str, np.ndarray] = {}
    for spec in config.inputs:
        tensor = given.get(spec.name)
        if tensor is None:
            raise InvalidInputError(f"missing input {spec.name!r}")
        if tensor.datatype != spec.datatype:
            raise InvalidInputError(
                f"input {spec.name!r} has datatype {tensor.datatype}, the model expects {spec.datatype}"
            )
        _check_shape(config, spec, tensor)
        arrays[spec.name] = tensor.data
    if config.batched:
        _check_batch(config, arrays)
    return arrays


def _check_batch(config: ModelConfig, arrays: dict[str, np.ndarray]) -> None:
    rows = {array.shape[0] for array in arrays.values()}
    if len(rows) > 1:
        raise InvalidInputError(f"inputs disagree on the batch size: {sorted(rows)}")
    (batch,) = rows
    if not 1 <= batch <= config.max_batch_size:
        raise InvalidInputError(f"batch size {batch} is outside 1..{config.max_batch_size}")


def check_requested_outputs(config: ModelConfig, request: InferRequest) -> None:
    """Names the model has, each once (as Triton refuses an output asked for twice), and a valid
    ``classification`` parameter, before the request is queued or run."""
    specs = {spec.name: spec for spec in config.outputs}
    seen = set()
    for output in request.outputs:
        spec = specs.get(output.name)
        if spec is None:
            raise InvalidInputError(f"unknown output {output.name!r}; the model has {sorted(specs)}")
        if output.name in seen:
            raise InvalidInputError(f"output {output.name!r} is requested more than once")
        seen.add(output.name)
        if "classification" in output.parameters:
            top_k_count(output.parameters["classification"])
            if spec.datatype == "BYTES":
                raise InvalidInputError(f"classification needs a numeric output; {output.name!r} is BYTES")
