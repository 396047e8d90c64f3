"""The v2 REST body (JSON, and Triton's binary tensor extension) as the server reads it: what the
protocol leaves one way to say is refused when said another."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from inferd.server.kserve.rest_codec import parse_infer_request
from inferd.serving.errors import InvalidInputError

FOUR = np.arange(4, dtype=np.float32)


def _binary_body(header: dict[str, Any]) -> tuple[bytes, str]:
    """``header`` then FOUR's raw bytes, with the header's length."""
    text = json.dumps(header).encode()
    return text + FOUR.tobytes(), str(len(text))


def _binary_input(**extra: Any) -> dict[str, Any]:
    parameters = {"binary_data_size": FOUR.nbytes}
    return {"name": "x", "datatype": "FP32", "shape": [4], "parameters": parameters, **extra}


def test_a_binary_input_and_the_output_flags_are_read() -> None:
    header = {"id": "r1", "inputs": [_binary_input()], "parameters": {"binary_data_output": True},
              "outputs": [{"name": "y", "parameters": {"binary_data": False}}]}  # fmt: skip
    request, binary_output = parse_infer_request(*_binary_body(header))
    np.testing.assert_array_equal(request.inputs[0].data, FOUR)
    assert request.id == "r1" and binary_output is True


@pytest.mark.parametrize(
    ("header", "words"),
    [
        ({"inputs": [_binary_input(data=[9, 9, 9, 9])]}, "has both data and binary_data_size"),
        # JSON's false, not a string that Python reads as true.
        ({"inputs": [_binary_input()], "parameters": {"binary_data_output": "false"}},
         "binary_data_output must be true or false, got 'false'"),
        ({"inputs": [_binary_input()], "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]},
         "output 'y' binary_data must be true or false, got 1"),
        ({"id": 5, "inputs": [_binary_input()]}, "id must be a string, got 5"),
        # Echoed in the answer, which a strict JSON reader then refuses.
        ({"id": "\ud800", "inputs": [_binary_input()]}, "id must be valid text"),
    ],
)  # fmt: skip
def test_a_body_said_another_way_than_the_protocols_is_refused(header: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidInputError, match=words):
        parse_infer_request(*_binary_body(header))
