"""Triton's system shared memory extension, driven by tritonclient over REST and gRPC: inputs read
from and outputs written to regions a client on this machine registered."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import tritonclient.utils.shared_memory as shm
from kserve_support import LiveServer, running_server
from tritonclient.utils import InferenceServerException

from inferd.serving.config import read_model_config
from inferd.serving.errors import InvalidInputError
from inferd.serving.runtimes.registry import default_runtime_registry
from inferd.serving.shared_memory import SharedMemoryRegions

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
IMAGES = np.random.default_rng(5).uniform(0, 16, size=(3, 8, 8)).astype(np.float32)
# Unique per run, so parallel runs on one machine do not share objects.
PREFIX = f"/inferd_test_{os.getpid()}"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shm_models")
    shutil.copytree(EXAMPLES / "digits", root / "digits")
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[LiveServer]:
    with running_server(repository, "--allow-client-shm") as live:
        yield live


@pytest.fixture
def regions() -> Iterator[dict[str, Any]]:
    """An input region holding the images and an output region, 256 bytes each."""
    made = {
        "in": shm.create_shared_memory_region("in", f"{PREFIX}_in", IMAGES.nbytes),
        "out": shm.create_shared_memory_region("out", f"{PREFIX}_out", 256),
    }
    shm.set_shared_memory_region(made["in"], [IMAGES])
    yield made
    for handle in made.values():
        shm.destroy_shared_memory_region(handle)


def _expected(repository: Path) -> dict[str, np.ndarray]:
    model_dir = repository / "digits"
    return default_runtime_registry().load(model_dir, read_model_config(model_dir)).infer({"image": IMAGES})


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_inputs_and_outputs_travel_through_shared_memory(
    server: LiveServer, repository: Path, regions: dict[str, Any], transport: str
) -> None:
    """The images go in through one region; `label` comes back in another, `probabilities` on the
    wire beside it; the status lists the regions until they are unregistered."""
    grpc = transport == "grpc"
    module: Any = triton_grpc if grpc else triton_http
    client = module.InferenceServerClient(server.grpc_url if grpc else server.http_address)
    assert "system_shared_memory" in (
        client.get_server_metadata().extensions if grpc else client.get_server_metadata()["extensions"]
    )
    client.register_system_shared_memory("images", f"{PREFIX}_in", IMAGES.nbytes)
    client.register_system_shared_memory("answers", f"{PREFIX}_out", 256)
    try:
        status = client.get_system_shared_memory_status()
        names = set(status.regions) if grpc else {region["name"] for region in status}
        assert names == {"images", "answers"}
        image = module.InferInput("image", list(IMAGES.shape), "FP32")
        image.set_shared_memory("images", IMAGES.nbytes)
        label = module.InferRequestedOutput("label")
        label.set_shared_memory("answers", 3 * 8, offset=16)
        probabilities = module.InferRequestedOutput("probabilities")
        result = client.infer("digits", [image], outputs=[label, probabilities])
        expected = _expected(repository)
        written = result.get_output("label")
        shape = list(written.shape) if grpc else written["shape"]
        assert shape == [3, 1]
        labels = shm.get_contents_as_numpy(regions["out"], np.int64, shape, offset=16)
        np.testing.assert_array_equal(labels, expected["label"])
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected["probabilities"], rtol=1e-6)
    finally:
        client.unregister_system_shared_memory()
    status = client.get_system_shared_memory_status()
    assert not (status.regions if grpc else status)


def test_what_does_not_fit_or_is_not_registered_is_refused(
    server: LiveServer, regions: dict[str, Any]
) -> None:
    client = triton_http.InferenceServerClient(server.http_address)
    client.register_system_shared_memory("images", f"{PREFIX}_in", IMAGES.nbytes)
    try:
        with pytest.raises(InferenceServerException, match="already registered"):
            client.register_system_shared_memory("images", f"{PREFIX}_in", IMAGES.nbytes)
        with pytest.raises(InferenceServerException, match="do not fit"):
            client.register_system_shared_memory("big", f"{PREFIX}_in", IMAGES.nbytes + 1)
        for key in ("/../../etc/passwd", "/a/b", "/"):  # nothing outside /dev/shm
            with pytest.raises(InferenceServerException, match="not a shared memory object's name"):
                client.register_system_shared_memory("escape", key, 4)
        with pytest.raises(InferenceServerException, match="cannot open shared memory key"):
            client.register_system_shared_memory("missing", f"{PREFIX}_missing", 4)
        link = Path("/dev/shm") / f"{PREFIX[1:]}_link"
        link.symlink_to(Path("/dev/shm") / f"{PREFIX[1:]}_in")
        try:  # a link in /dev/shm could point anywhere: not followed
            with pytest.raises(InferenceServerException, match="cannot open shared memory key"):
                client.register_system_shared_memory("linked", f"/{link.name}", 4)
        finally:
            link.unlink()

        image = triton_http.InferInput("image", list(IMAGES.shape), "FP32")
        image.set_shared_memory("nowhere", IMAGES.nbytes)
        with pytest.raises(InferenceServerException, match="no shared memory region 'nowhere'"):
            client.infer("digits", [image])
        image.set_shared_memory("images", IMAGES.nbytes, offset=8)
        with pytest.raises(InferenceServerException, match="pass the end of region 'images'"):
            client.infer("digits", [image])
        image = triton_http.InferInput("image", list(IMAGES.shape), "FP32")  # without that offset
        image.set_shared_memory("images", IMAGES.nbytes)
        # An output's region is checked before the model runs, not when its result is placed.
        executions = client.get_inference_statistics("digits")["model_stats"][0]["execution_count"]
        nowhere = triton_http.InferRequestedOutput("probabilities")
        nowhere.set_shared_memory("nowhere", 8)
        with pytest.raises(InferenceServerException, match="no shared memory region 'nowhere'"):
            client.infer("digits", [image], outputs=[nowhere])
        assert client.get_inference_statistics("digits")["model_stats"][0]["execution_count"] == executions
        client.register_system_shared_memory("small", f"{PREFIX}_out", 8)
        probabilities = triton_http.InferRequestedOutput("probabilities")
        probabilities.set_shared_memory("small", 8)
        with pytest.raises(InferenceServerException, match="more than the 8 of its shared memory"):
            client.infer("digits", [image], outputs=[probabilities])
    finally:
        client.unregister_system_shared_memory()


def test_placement_without_a_region_and_grpc_errors(server: LiveServer, regions: dict[str, Any]) -> None:
    """A size or offset without a region is refused, as Triton does; over gRPC each refusal is
    INVALID_ARGUMENT."""
    url = f"{server.http_url}/v2/models/digits/infer"
    image = {"name": "image", "datatype": "FP32", "shape": [1, 8, 8], "data": [0.0] * 64}
    stray = {**image, "parameters": {"shared_memory_byte_size": 256}}
    answer = httpx.post(url, json={"inputs": [stray]})
    assert answer.status_code == 400 and "need a shared_memory_region" in answer.json()["error"]
    output = {"name": "label", "parameters": {"shared_memory_offset": 0}}
    answer = httpx.post(url, json={"inputs": [image], "outputs": [output]})
    assert answer.status_code == 400 and "need a shared_memory_region" in answer.json()["error"]
    client = triton_grpc.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as refused:
        client.register_system_shared_memory("x", "/../x", 4)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    grpc_image = triton_grpc.InferInput("image", list(IMAGES.shape), "FP32")
    grpc_image.set_shared_memory("nowhere", IMAGES.nbytes)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("digits", [grpc_image])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and "nowhere" in refused.value.message()


def test_a_read_holds_no_lock_while_it_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large request's input is read on a worker thread: while the bytes are read, the loop's
    calls on the regions (status, register, an output's check) go on, and the read's own
    descriptor is closed after it."""
    (tmp_path / "obj").write_bytes(bytes(64))
    regions = SharedMemoryRegions(tmp_path)
    regions.register("r", "/obj", 0, 64)
    reading, release = threading.Event(), threading.Event()
    real_pread = os.pread

    def slow_pread(descriptor: int, size: int, offset: int) -> bytes:
        reading.set()
        assert release.wait(10)
        return real_pread(descriptor, size, offset)

    monkeypatch.setattr(os, "pread", slow_pread)
    open_before = len(os.listdir("/proc/self/fd"))
    placement = {"shared_memory_region": "r", "shared_memory_byte_size": 64}
    reader = threading.Thread(target=regions.read, args=(placement, "input 'x'"))
    reader.start()
    try:
        assert reading.wait(10)
        done = threading.Event()
        threading.Thread(target=lambda: (regions.status("r"), done.set())).start()
        assert done.wait(5), "the region's calls waited for the read"
    finally:
        release.set()
        reader.join()
    assert len(os.listdir("/proc/self/fd")) == open_before
    regions.close()


def test_reads_of_an_object_shrinking_and_growing_never_fault(tmp_path: Path) -> None:
    """A client may truncate its object while the server reads it: every read gives the whole
    span or a refusal (a mapping read past the end would kill the process with SIGBUS)."""
    size = 1 << 20
    (tmp_path / "obj").write_bytes(bytes(size))
    regions = SharedMemoryRegions(tmp_path)
    regions.register("r", "/obj", 0, size)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            os.truncate(tmp_path / "obj", 16)
            os.truncate(tmp_path / "obj", size)

    churner = threading.Thread(target=churn)
    churner.start()
    placement = {"shared_memory_region": "r", "shared_memory_byte_size": size}
    outcomes: set[int | str] = set()
    try:
        for _ in range(300):
            try:
                outcomes.add(len(regions.read(placement, "input 'x'")))
            except InvalidInputError:
                outcomes.add("refused")
    finally:
        stop.set()
        churner.join()
        regions.close()
    assert outcomes <= {size, "refused"}


def test_registered_regions_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from inferd.serving import shared_memory

    monkeypatch.setattr(shared_memory, "MAX_REGIONS", 2)
    (tmp_path / "obj").write_bytes(bytes(8))
    regions = SharedMemoryRegions(tmp_path)
    regions.register("a", "/obj", 0, 8)
    regions.register("b", "/obj", 0, 8)
    with pytest.raises(InvalidInputError, match="2 shared memory regions are registered"):
        regions.register("c", "/obj", 0, 8)
    regions.unregister("a")
    regions.register("c", "/obj", 0, 8)
    assert [r["name"] for r in regions.status()] == ["b", "c"]
    regions.close()


def test_an_object_that_shrank_after_registering_is_refused_not_read(
    server: LiveServer, regions: dict[str, Any]
) -> None:
    """Reading a mapping past the end of its object would kill the server (SIGBUS): each access
    looks at the object's size first."""
    client = triton_http.InferenceServerClient(server.http_address)
    client.register_system_shared_memory("images", f"{PREFIX}_in", IMAGES.nbytes)
    try:
        os.truncate(Path("/dev/shm") / f"{PREFIX[1:]}_in", 16)
        image = triton_http.InferInput("image", list(IMAGES.shape), "FP32")
        image.set_shared_memory("images", IMAGES.nbytes)
        with pytest.raises(InferenceServerException, match="has shrunk"):
            client.infer("digits", [image])
        assert client.is_server_live()
    finally:
        client.unregister_system_shared_memory()


def test_a_server_without_the_flag_takes_no_region(repository: Path, regions: dict[str, Any]) -> None:
    with running_server(repository) as live:
        client = triton_http.InferenceServerClient(live.http_address)
        assert "system_shared_memory" not in client.get_server_metadata()["extensions"]
        with pytest.raises(InferenceServerException, match="--allow-client-shm"):
            client.register_system_shared_memory("images", f"{PREFIX}_in", IMAGES.nbytes)
        image = triton_http.InferInput("image", list(IMAGES.shape), "FP32")
        image.set_shared_memory("images", IMAGES.nbytes)
        with pytest.raises(InferenceServerException, match="--allow-client-shm"):
            client.infer("digits", [image])
