"""The v2 gRPC wire format: protobuf messages to and from the data plane's tensors.

Inputs may come as typed `contents` or as `raw_input_contents`; outputs always go back as
`raw_output_contents` (as Triton does), the only form that carries FP16 and BF16 and the one
tritonclient reads for every datatype.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from inferd.serving.codec import array_from_json, array_from_raw, array_to_raw
from inferd.serving.datatypes import DATATYPES
from inferd.serving.errors import InvalidInputError
from inferd.serving.shared_memory import SharedMemoryRegions, allowed, in_shared_memory, read_input
from inferd.serving.tensor import InferRequest, InferResponse, Parameters, RequestedOutput, Tensor

# Which typed `contents` field holds each datatype; FP16 and BF16 have none (raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameters_from_proto(parameters: Any) -> Parameters:
    decoded: Parameters = {}
    for key, value in parameters.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            decoded[key] = getattr(value, choice)
    return decoded


def parameters_to_proto(target: Any, parameters: Parameters) -> None:
    for key, value in parameters.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        else:
            target[key].string_param = str(value)


def _typed_contents(tensor: Any, shape: list[int]) -> np.ndarray:
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidInputError(
            f"input {tensor.name!r}: {tensor.datatype} data must be sent in raw_input_contents"
        )
    # Contents of another type (an FP32 input's values in int64_contents) would read as none.
    others = sorted({f for f in _CONTENTS_FIELD.values() if f != field and getattr(tensor.contents, f)})
    if others:
        raise InvalidInputError(
            f"input {tensor.name!r}: {tensor.datatype} contents go in {field}, not {', '.join(others)}"
        )
    # Proto values are already typed (float, int, bool, bytes), so the JSON element checks hold.
    return array_from_json(tensor.datatype, shape, list(getattr(tensor.contents, field)))


def request_from_proto(message: Any, regions: SharedMemoryRegions | None = None) -> InferRequest:
    """``regions``: the shared memory regions an input may be read from (None: the server takes
    none). Inputs in shared memory have no entry in ``raw_input_contents``, as Triton's clients
    send them."""
    raw_contents = list(message.raw_input_contents)
    parameters = [parameters_from_proto(tensor.parameters) for tensor in message.inputs]
    on_wire = [not in_shared_memory(p) for p in parameters]
    if raw_contents and len(raw_contents) != sum(on_wire):
        raise InvalidInputError(
            f"raw_input_contents has {len(raw_contents)} entries for {sum(on_wire)} inputs"
        )
    raw_index = itertools.count()
    inputs = []
    for tensor, tensor_parameters, wired in zip(message.inputs, parameters, on_wire, strict=True):
        if tensor.datatype not in DATATYPES:
            raise InvalidInputError(f"input {tensor.name!r} has unknown datatype {tensor.datatype!r}")
        shape = [int(d) for d in tensor.shape]
        if any(d < 0 for d in shape):
            raise InvalidInputError(f"input {tensor.name!r} shape must be non-negative")
        if not wired:
            if tensor.contents.ByteSize():  # as Triton: one place for the data
                raise InvalidInputError(
                    f"input {tensor.name!r} has contents besides its shared memory region"
                )
            inputs.append(
                read_input(allowed(regions), tensor.name, tensor.datatype, shape, tensor_parameters)
            )
            continue
        index = next(raw_index)
        if raw_contents:
            if tensor.contents.ByteSize():  # as Triton: the two ways of sending data do not mix
                raise InvalidInputError(
                    f"input {tensor.name!r}: contents must not be set when raw_input_contents is used"
                )
            data = array_from_raw(tensor.datatype, shape, raw_contents[index])
        else:
            data = _typed_contents(tensor, shape)
        inputs.append(Tensor(tensor.name, tensor.datatype, data, tensor_parameters))
    return InferRequest(
        inputs=inputs,
        outputs=[RequestedOutput(o.name, parameters_from_proto(o.parameters)) for o in message.outputs],
        id=message.id or None,
        parameters=parameters_from_proto(message.parameters),
    )


def response_to_proto(response: InferResponse, pb2: Any) -> Any:
    message = pb2.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id or ""
    )
    parameters_to_proto(message.parameters, response.parameters)
    for tensor in response.outputs:
        output = message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        parameters_to_proto(output.parameters, tensor.parameters)
        # An output written to shared memory keeps its place in the list, empty, so the others'
        # contents stay at their outputs' indices.
        shared = in_shared_memory(tensor.parameters)
        message.raw_output_contents.append(b"" if shared else array_to_raw(tensor.datatype, tensor.data))
    return message
