"""Triton's system shared memory extension: a client on the same machine registers named regions
of POSIX shared memory (objects under /dev/shm), then sends an input's bytes, or has an output's
written, there instead of in the request and response bodies.

An input or a requested output names its region with the parameters `shared_memory_region`,
`shared_memory_byte_size` and, optionally, `shared_memory_offset` (from the region's start). A
written output comes back with its shape, `shared_memory_region` and the bytes written as
`shared_memory_byte_size`, and no data. Keys are object names (`/name`, as shm_open takes them):
nothing outside /dev/shm can be opened. The bytes are read and written with pread and pwrite, not
through a mapping: a client may shrink its object at any time, and a mapping read past the
object's end would kill the server (SIGBUS) where a short read is only a refused request.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

import numpy as np

from inferd.serving.codec import array_from_raw, array_to_raw, element_count
from inferd.serving.datatypes import numpy_dtype
from inferd.serving.errors import InvalidInputError
from inferd.serving.tensor import InferRequest, Parameters, Tensor

SHM_ROOT = Path("/dev/shm")
# Registered regions at most: each holds a descriptor open.
MAX_REGIONS = 256
# The most bytes a BYTES input (whose size its shape does not fix) is read from a region unless the
# server says otherwise: the servers' default request body limit (--max-body-bytes).
DEFAULT_MAX_BYTES_INPUT = 64 * 2**20
REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"
_PARAMETERS = (REGION, BYTE_SIZE, OFFSET)


@dataclass(frozen=True)
class _Region:
    key: str
    offset: int  # where the region starts in the shared memory object
    byte_size: int
    descriptor: int  # the object, open for reading and writing


class SharedMemoryRegions:
    """The registered regions, by name. Thread-safe: the REST and gRPC servers share one."""

    def __init__(self, root: Path = SHM_ROOT, max_bytes_input: int = DEFAULT_MAX_BYTES_INPUT) -> None:
        """``max_bytes_input``: the most bytes one BYTES input may take from a region (the
        server's body limit: what the input could have been sent as in the request)."""
        self._root = root
        self._max_bytes_input = max_bytes_input
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: object, offset: object, byte_size: object) -> None:
        """``key``, ``offset`` and ``byte_size`` as a client sent them: checked here."""
        if not isinstance(key, str):
            raise InvalidInputError(f"key must be a shared memory object's name, got {key!r}")
        for field, value in (("offset", offset), ("byte_size", byte_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInputError(f"{field} must be a non-negative integer, got {value!r}")
        if not name:
            raise InvalidInputError("a shared memory region needs a name")
        path = self._path(key)
        with self._lock:
            if name in self._regions:
                raise InvalidInputError(f"shared memory region {name!r} is already registered")
            if len(self._regions) >= MAX_REGIONS:
                raise InvalidInputError(
                    f"{MAX_REGIONS} shared memory regions are registered; unregister some first"
                )
            try:
                # Not through a link: /dev/shm is writable by anyone, a link there could point anywhere.
                descriptor = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            except OSError as exc:
                raise InvalidInputError(f"cannot open shared memory key {key!r}: {exc.strerror}") from None
            assert isinstance(offset, int) and isinstance(byte_size, int)
            try:
                stat = os.fstat(descriptor)
                size = stat.st_size
                if not S_ISREG(stat.st_mode):
                    raise InvalidInputError(f"shared memory key {key!r} is not a shared memory object")
                if offset + byte_size > size or byte_size == 0:
                    raise InvalidInputError(
                        f"shared memory key {key!r} holds {size} bytes; offset {offset} and byte_size "
                        f"{byte_size} do not fit in it"
                    )
            except BaseException:
                os.close(descriptor)
                raise
            self._regions[name] = _Region(key, offset, byte_size, descriptor)

    def unregister(self, name: str | None = None) -> None:
        """One region (an unknown name is no error, as in Triton), or every one (None)."""
        with self._lock:
            names = list(self._regions) if name is None else [name]
            for gone in names:
                region = self._regions.pop(gone, None)
                if region is not None:
                    os.close(region.descriptor)

    def status(self, name: str | None = None) -> list[dict[str, str | int]]:
        with self._lock:
            if name is not None and name not in self._regions:
                raise InvalidInputError(f"no shared memory region {name!r} is registered")
            names = list(self._regions) if name is None else [name]
            return [
                {"name": n, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
                for n, r in ((n, self._regions[n]) for n in names)
            ]

    def read(
        self, parameters: Parameters, what: str, datatype: str | None = None, shape: Sequence[int] = ()
    ) -> bytes:
        """The bytes an input's parameters point at. Given the input's ``datatype`` and ``shape``,
        the size its parameters claim is checked against them before anything is read: the client
        names that size, and a sparse object that costs it nothing would cost the server as much."""
        with self._lock:
            region, start, size = self._span(parameters, what)
            if datatype is not None:
                self._check_input_size(what, datatype, shape, size)
            # Read through a descriptor of its own, outside the lock: a read on a worker thread
            # (a large request's decoding) would otherwise hold the event loop's calls up.
            descriptor = os.dup(region.descriptor)
        try:
            chunks, done = [], 0
            while done < size:  # one call moves at most about 2 GiB
                chunk = os.pread(descriptor, size - done, start + done)
                if not chunk:
                    raise InvalidInputError(f"{what}: the shared memory object of its region has shrunk")
                chunks.append(chunk)
                done += len(chunk)
        finally:
            os.close(descriptor)
        return b"".join(chunks)

    def write(self, parameters: Parameters, what: str, data: bytes) -> None:
        """``data`` at the place a requested output's parameters point at (it must fit)."""
        with self._lock:
            region, start, size = self._span(parameters, what)
            if len(data) > size:
                raise InvalidInputError(
                    f"{what} takes {len(data)} bytes, more than the {size} of its shared memory"
                )
            if os.fstat(region.descriptor).st_size < start + len(data):
                raise InvalidInputError(f"{what}: the shared memory object of its region has shrunk")
            view, done = memoryview(data), 0
            while done < len(data):  # one call moves at most about 2 GiB
                done += os.pwrite(region.descriptor, view[done:], start + done)

    def check_span(self, parameters: Parameters, what: str) -> None:
        """That ``parameters`` name a registered region and a span inside it (as `write` will
        need them), before the work whose result goes there."""
        with self._lock:
            self._span(parameters, what)

    def close(self) -> None:
        self.unregister()

    def _check_input_size(self, what: str, datatype: str, shape: Sequence[int], size: int) -> None:
        if datatype == "BYTES":  # elements of any length: bounded as a request body is
            if size > self._max_bytes_input:
                raise InvalidInputError(
                    f"{what}: {BYTE_SIZE} {size} is over the {self._max_bytes_input} bytes a BYTES "
                    "input may take from shared memory (the server's body limit)"
                )
            return
        needed = element_count(shape) * _raw_itemsize(datatype)
        if size != needed:
            raise InvalidInputError(
                f"{what}: {datatype} shape {list(shape)} needs {needed} bytes, {BYTE_SIZE} is {size}"
            )

    def _path(self, key: str) -> str:
        # An object's name: one "/" at most, leading; nothing that walks out of /dev/shm.
        name = key[1:] if key.startswith("/") else key
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise InvalidInputError(f"shared memory key {key!r} is not a shared memory object's name")
        return str(self._root / name)

    def _span(self, parameters: Parameters, what: str) -> tuple[_Region, int, int]:
        name = parameters.get(REGION)
        region = self._regions.get(name) if isinstance(name, str) else None
        if region is None:
            raise InvalidInputError(f"{what}: no shared memory region {name!r} is registered")
        size, offset = parameters.get(BYTE_SIZE), parameters.get(OFFSET, 0)
        for field, value in ((BYTE_SIZE, size), (OFFSET, offset)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInputError(f"{what}: {field} must be a non-negative integer, got {value!r}")
        assert isinstance(size, int) and isinstance(offset, int)
        if offset + size > region.byte_size:
            raise InvalidInputError(
                f"{what}: offset {offset} and {size} bytes pass the end of region {name!r} "
                f"({region.byte_size} bytes)"
            )
        return region, region.offset + offset, size


def allowed(regions: SharedMemoryRegions | None) -> SharedMemoryRegions:
    """The regions, or the error of a server that takes none."""
    if regions is None:
        raise InvalidInputError(
            "system shared memory is off on this server (start it with --allow-client-shm)"
        )
    return regions


def _raw_itemsize(datatype: str) -> int:
    """The bytes one element of a fixed-size datatype takes on the wire (BF16: 2, held as FP32)."""
    return 2 if datatype == "BF16" else numpy_dtype(datatype).itemsize


def in_shared_memory(parameters: Parameters) -> bool:
    """Whether a tensor's parameters place it in a region; a size or offset without a region is
    refused, as Triton does."""
    if REGION not in parameters and (BYTE_SIZE in parameters or OFFSET in parameters):
        raise InvalidInputError(f"{BYTE_SIZE} and {OFFSET} need a {REGION}")
    return REGION in parameters


def without_placement(parameters: Parameters) -> Parameters:
    """The parameters, less those that place a tensor in shared memory."""
    return {k: v for k, v in parameters.items() if k not in _PARAMETERS}


def read_input(
    regions: SharedMemoryRegions, name: str, datatype: str, shape: Sequence[int], parameters: Parameters
) -> Tensor:
    """An input whose bytes are in a region, of the size its datatype and shape give it."""
    raw = regions.read(parameters, f"input {name!r}", datatype, shape)
    return Tensor(name, datatype, array_from_raw(datatype, shape, raw), without_placement(parameters))


def check_output_places(regions: SharedMemoryRegions | None, request: InferRequest) -> None:
    """Each output asked for in shared memory names a registered region and a span inside it:
    checked before the model runs, where a refusal found as the outputs were placed came after
    the work (a whole generation, on an LLM)."""
    for output in request.outputs:
        if in_shared_memory(output.parameters):
            allowed(regions).check_span(output.parameters, f"output {output.name!r}")


def place_outputs(regions: SharedMemoryRegions, request: InferRequest, outputs: list[Tensor]) -> None:
    """Write each output asked for in a region there; its parameters then say where and how much,
    and the wire formats leave its data out."""
    asked = {out.name: out.parameters for out in request.outputs if in_shared_memory(out.parameters)}
    for tensor in outputs:
        parameters = asked.get(tensor.name)
        if parameters is None:
            continue
        raw = array_to_raw(tensor.datatype, np.asarray(tensor.data))
        regions.write(parameters, f"output {tensor.name!r}", raw)
        tensor.parameters = {**tensor.parameters, REGION: parameters[REGION], BYTE_SIZE: len(raw)}
