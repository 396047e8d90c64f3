"""Shared memory inputs are read at the size their tensor has, not at the size the client claims
(audit #9): the claim is checked against the datatype and shape (a BYTES input against the body
limit) before a byte is read. A sparse /dev/shm object costs its client nothing, and the server
read (and allocated) whatever size the client named before the shape check refused it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inferd.server.kserve.rest_codec import parse_infer_request
from inferd.serving import shared_memory
from inferd.serving.errors import InvalidInputError
from inferd.serving.shared_memory import SharedMemoryRegions, read_input

CLAIMED = 1 << 30  # what the client says its input takes
REGION = "r"


def _sparse_region(root: Path, regions: SharedMemoryRegions) -> Iterator[SharedMemoryRegions]:
    """A region over a sparse 1 GiB object: it costs the test nothing, as it costs a client nothing."""
    with open(root / "obj", "wb") as sparse:
        sparse.truncate(CLAIMED)
    regions.register(REGION, "/obj", 0, CLAIMED)
    yield regions
    regions.close()


@pytest.fixture
def regions(tmp_path: Path) -> Iterator[SharedMemoryRegions]:
    yield from _sparse_region(tmp_path, SharedMemoryRegions(tmp_path))


@pytest.fixture
def limited_regions(tmp_path: Path) -> Iterator[SharedMemoryRegions]:
    """Where the server's body limit is 4096 bytes."""
    yield from _sparse_region(tmp_path, SharedMemoryRegions(tmp_path, max_bytes_input=4096))


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte counts the server asks the object for."""
    asked: list[int] = []
    real_pread = os.pread

    def pread(descriptor: int, count: int, offset: int) -> bytes:
        asked.append(count)
        assert count <= 1 << 20, f"a read of {count} bytes for a small tensor"
        return real_pread(descriptor, count, offset)

    monkeypatch.setattr(shared_memory.os, "pread", pread)
    return asked


def _placed(byte_size: int) -> dict[str, Any]:
    return {"shared_memory_region": REGION, "shared_memory_byte_size": byte_size}


@pytest.mark.parametrize(
    ("datatype", "shape", "needed"),
    [("FP32", [1, 8, 8], 256), ("BF16", [2, 3], 12), ("BOOL", [5], 5), ("INT64", [0, 4], 0)],
)
def test_a_fixed_size_input_claiming_another_size_is_refused_unread(
    regions: SharedMemoryRegions, reads: list[int], datatype: str, shape: list[int], needed: int
) -> None:
    for claimed in (needed + 1, CLAIMED):
        with pytest.raises(InvalidInputError, match=f"needs {needed} bytes, shared_memory_byte_size is"):
            read_input(regions, "image", datatype, shape, _placed(claimed))
    assert reads == []


def test_a_fixed_size_input_of_its_size_is_read(regions: SharedMemoryRegions, reads: list[int]) -> None:
    tensor = read_input(regions, "image", "FP32", [1, 8, 8], _placed(256))
    np.testing.assert_array_equal(tensor.data, np.zeros((1, 8, 8), dtype=np.float32))
    assert reads == [256]


def test_a_bytes_input_over_the_body_limit_is_refused_unread(
    limited_regions: SharedMemoryRegions, reads: list[int]
) -> None:
    with pytest.raises(InvalidInputError, match="over the 4096 bytes a BYTES input may take"):
        read_input(limited_regions, "text", "BYTES", [1], _placed(CLAIMED))
    assert reads == []
    # Within the limit it is read, and its elements checked as they are in a request body.
    with pytest.raises(InvalidInputError, match="BYTES raw contents"):
        read_input(limited_regions, "text", "BYTES", [2000], _placed(4096))
    assert reads == [4096]


def test_the_rest_codec_checks_the_claim_before_reading(
    regions: SharedMemoryRegions, reads: list[int]
) -> None:
    image = {"name": "image", "datatype": "FP32", "shape": [1, 8, 8], "parameters": _placed(CLAIMED)}
    body = json.dumps({"inputs": [image]}).encode()
    with pytest.raises(InvalidInputError, match="needs 256 bytes"):
        parse_infer_request(body, None, regions)
    assert reads == []


def test_the_byte_limit_defaults_to_the_servers_body_limit(tmp_path: Path) -> None:
    from inferd.server.limits import DEFAULT_MAX_BODY_BYTES

    assert shared_memory.DEFAULT_MAX_BYTES_INPUT == DEFAULT_MAX_BODY_BYTES
