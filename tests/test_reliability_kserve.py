"""KServe v2 under overload and bad tensors: the served LLM's full queue is a 429 with Retry-After over
REST and RESOURCE_EXHAUSTED over gRPC; a tensor whose shape does not match its data is a 400 /
INVALID_ARGUMENT, never a server error."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from kserve_support import free_port
from server_process import ServerProcess, run_server
from tritonclient.utils import InferenceServerException

SERVED = "tiny"
LONG = {"prompt": "To be, or not", "max_tokens": 450, "ignore_eos": True, "temperature": 0.0, "stream": True}


@pytest.fixture(scope="module")
def live(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    grpc_port = free_port()
    args = (
        "--served-model-name", SERVED,
        "--kv-cache-memory", "8MiB",
        "--max-num-seqs", "1",
        "--max-queued-requests", "1",
        "--model-repository", str(tmp_path_factory.mktemp("repository")),
        "--grpc-port", str(grpc_port),
    )  # fmt: skip
    with run_server(tiny_llama, *args) as server:
        yield server, f"127.0.0.1:{grpc_port}"


def _text_input(shape: list[int], values: list[bytes]) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("text_input", shape, "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=object).reshape(shape))
    return tensor


def test_full_queue_is_429_over_rest_resource_exhausted_over_grpc(
    live: tuple[ServerProcess, str],
) -> None:
    server, grpc_url = live
    stop = threading.Event()

    def fill() -> None:
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=LONG, timeout=60) as response:
            for _ in response.iter_lines():
                if stop.is_set():
                    return

    fillers = [threading.Thread(target=fill)]
    fillers[0].start()
    server.wait_for_metrics(lambda m: m["inferd:num_requests_running"] == 1)
    fillers.append(threading.Thread(target=fill))
    fillers[1].start()  # waits behind the running one: the queue (1) is full
    try:
        server.wait_for_metrics(lambda m: m["inferd:num_requests_waiting"] == 1)
        response = httpx.post(
            f"{server.base_url}/v2/models/{SERVED}/generate", json={"text_input": "To be"}, timeout=10
        )
        assert response.status_code == 429 and "overloaded" in response.json()["error"]
        assert int(response.headers["Retry-After"]) >= 1
        client = triton_grpc.InferenceServerClient(grpc_url)
        with pytest.raises(InferenceServerException) as refused:
            client.infer(SERVED, [_text_input([1], [b"To be"])])
        assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    finally:
        stop.set()
        for thread in fillers:
            thread.join(timeout=60)


def test_tensor_shape_not_matching_its_data_is_invalid_input(live: tuple[ServerProcess, str]) -> None:
    server, grpc_url = live
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [3], "data": ["To be"]}]}
    response = httpx.post(f"{server.base_url}/v2/models/{SERVED}/infer", json=body, timeout=10)
    assert response.status_code == 400 and set(response.json()) == {"error"}
    client = triton_grpc.InferenceServerClient(grpc_url)
    mismatched = _text_input([1], [b"To be"])
    mismatched._get_tensor().shape[:] = [4]  # declared 4 elements, 1 sent
    with pytest.raises(InferenceServerException) as refused:
        client.infer(SERVED, [mismatched])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
