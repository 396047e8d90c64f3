"""The v2 REST wire format: JSON tensors plus Triton's binary tensor data extension.

With the extension, the body is a JSON header of `Inference-Header-Content-Length` bytes followed by
the raw contents of every input whose `parameters.binary_data_size` is set, in input order.
Outputs requested with `binary_data: true` (or all, with request parameter `binary_data_output`)
come back the same way.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from inferd.serving.codec import array_from_json, array_from_raw, array_to_json, array_to_raw
from inferd.serving.datatypes import DATATYPES
from inferd.serving.errors import InvalidInputError
from inferd.serving.shared_memory import SharedMemoryRegions, allowed, in_shared_memory, read_input
from inferd.serving.tensor import InferRequest, InferResponse, Parameters, RequestedOutput, Tensor
from inferd.writable import is_writable_text

HEADER_LENGTH = "Inference-Header-Content-Length"
# Parameters that steer the wire format; they are consumed here and never reach the model.
_WIRE_PARAMETERS = ("binary_data", "binary_data_size", "binary_data_output")


def _parameters(raw: Any, where: str) -> Parameters:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, (bool, int, float, str)) for v in raw.values()):
        raise InvalidInputError(f"{where} parameters must be an object of scalars")
    return dict(raw)


def _shape(raw: Any, name: str) -> list[int]:
    if not isinstance(raw, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw
    ):
        raise InvalidInputError(f"input {name!r} shape must be a list of non-negative integers")
    return raw


def _input_tensor(
    raw: Any, binary: memoryview, offset: int, regions: SharedMemoryRegions | None
) -> tuple[Tensor, int]:
    """One input tensor and the offset past its binary contents (if any); an input in a shared
    memory region is read from there (``regions``: None where the server takes none)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise InvalidInputError("each input must be an object with a name")
    name = raw["name"]
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise InvalidInputError(f"input {name!r} has unknown datatype {datatype!r}")
    shape = _shape(raw.get("shape"), name)
    parameters = _parameters(raw.get("parameters"), f"input {name!r}")
    if in_shared_memory(parameters):
        if "data" in raw or "binary_data_size" in parameters:  # as Triton: one place for the data
            raise InvalidInputError(f"input {name!r} has data besides its shared memory region")
        return read_input(allowed(regions), name, datatype, shape, parameters), offset
    size = parameters.pop("binary_data_size", None)
    if size is not None:
        if "data" in raw:  # one place for the data, as for a shared memory region
            raise InvalidInputError(f"input {name!r} has both data and binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InvalidInputError(f"input {name!r} binary_data_size does not fit the request body")
        data = array_from_raw(datatype, shape, bytes(binary[offset : offset + size]))
        return Tensor(name, datatype, data, parameters), offset + size
    if "data" not in raw:
        raise InvalidInputError(f"input {name!r} has neither data nor binary_data_size")
    return Tensor(name, datatype, array_from_json(datatype, shape, raw["data"]), parameters), offset


def parse_infer_request(
    body: bytes, header_length: str | None, regions: SharedMemoryRegions | None = None
) -> tuple[InferRequest, bool]:
    """The request, and whether outputs default to binary (`binary_data_output`)."""
    try:
        json_size = len(body) if header_length is None else int(header_length)
    except ValueError:
        raise InvalidInputError(f"{HEADER_LENGTH} must be an integer") from None
    if not 0 <= json_size <= len(body):
        raise InvalidInputError(f"{HEADER_LENGTH} {json_size} is outside the body of {len(body)} bytes")
    try:
        header = json.loads(body[:json_size])
    # ValueError: bad JSON or UTF-8, and an integer past Python's 4,300-digit limit; deep nesting: recursion
    except (ValueError, RecursionError) as exc:
        raise InvalidInputError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise InvalidInputError("request must be a JSON object with an 'inputs' list")
    binary = memoryview(body)[json_size:]
    inputs, offset = [], 0
    for raw_input in header["inputs"]:
        tensor, offset = _input_tensor(raw_input, binary, offset, regions)
        inputs.append(tensor)
    if offset != len(binary):
        raise InvalidInputError(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    parameters = _parameters(header.get("parameters"), "request")
    binary_output = _flag(parameters.pop("binary_data_output", False), "request binary_data_output")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInputError(f"id must be a string, got {request_id!r}")
    if request_id is not None and not is_writable_text(request_id):  # the answer echoes it
        raise InvalidInputError("id must be valid text (a lone surrogate, \\ud800, is not)")
    return (
        InferRequest(
            inputs=inputs,
            outputs=_requested_outputs(header.get("outputs")),
            id=request_id,
            parameters=parameters,
        ),
        binary_output,
    )


def _requested_outputs(raw: Any) -> list[RequestedOutput]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in raw
    ):
        raise InvalidInputError("outputs must be a list of objects with a name")
    outputs = [
        RequestedOutput(o["name"], _parameters(o.get("parameters"), f"output {o['name']!r}")) for o in raw
    ]
    for output in outputs:
        if "binary_data" in output.parameters:
            _flag(output.parameters["binary_data"], f"output {output.name!r} binary_data")
    return outputs


def _flag(value: object, where: str) -> bool:
    """A boolean parameter: JSON's true or false ("false" would read as true)."""
    if not isinstance(value, bool):
        raise InvalidInputError(f"{where} must be true or false, got {value!r}")
    return value


def _wants_binary(request: InferRequest, name: str, default: bool) -> bool:
    for output in request.outputs:
        if output.name == name and "binary_data" in output.parameters:
            return bool(output.parameters["binary_data"])
    return default


def encode_infer_response(
    response: InferResponse, request: InferRequest, binary_default: bool
) -> tuple[bytes, int | None]:
    """The response body and, when binary outputs follow the JSON, the JSON header's length."""
    outputs_json: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for tensor in response.outputs:
        parameters = {k: v for k, v in tensor.parameters.items() if k not in _WIRE_PARAMETERS}
        item: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if in_shared_memory(tensor.parameters):
            pass  # written to its region: the parameters say where, and no data follows
        elif _wants_binary(request, tensor.name, binary_default):
            raw = array_to_raw(tensor.datatype, tensor.data)
            parameters["binary_data_size"] = len(raw)
            chunks.append(raw)
        else:
            item["data"] = array_to_json(tensor.datatype, np.asarray(tensor.data))
        if parameters:
            item["parameters"] = parameters
        outputs_json.append(item)
    header: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = response.parameters
    header["outputs"] = outputs_json
    header_bytes = json.dumps(header).encode("utf-8")
    if not chunks:
        return header_bytes, None
    return header_bytes + b"".join(chunks), len(header_bytes)
