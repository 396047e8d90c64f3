"""Where a live classic-model server meets Triton's model configuration and request parameters, with
the real tritonclient over REST and gRPC: the object form of `dynamic_batching` (its delay and
preferred sizes), request timeouts while a request waits in the batcher's queue, per-request
statistics, a folder laid out for Triton (config.pbtxt, no model.json), and the LLM's sampling
fields refused by name."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from kserve_support import LiveServer, running_server
from tritonclient.utils import InferenceServerException

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
# One second of queue delay: a lone request waits it out, so a shorter timeout expires in the queue.
SLOW_DELAY_US = 1_000_000
IMAGE = {"name": "image", "datatype": "FP32", "shape": [1, 8, 8], "data": [0.0] * 64}


def _digits_copy(root: Path, name: str, **changes: Any) -> None:
    shutil.copytree(EXAMPLES / "digits", root / name)
    config = json.loads((root / name / "model.json").read_text())
    del config["max_queue_delay_ms"]
    (root / name / "model.json").write_text(json.dumps({**config, "name": name, **changes}))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("repository")
    batching = {"max_queue_delay_microseconds": SLOW_DELAY_US, "preferred_batch_size": [4]}
    _digits_copy(root, "slow_digits", dynamic_batching=batching)
    _digits_copy(root, "default_batching", dynamic_batching={})
    # Triton's layout: config.pbtxt and a version folder, no model.json.
    (root / "triton_style" / "1").mkdir(parents=True)
    shutil.copy(EXAMPLES / "digits" / "model.onnx", root / "triton_style" / "1" / "model.onnx")
    (root / "triton_style" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\nmax_batch_size: 8\n')
    (root / "echo_llm").mkdir()
    (root / "echo_llm" / "model.json").write_text(json.dumps({"runtime": "llm"}))
    with running_server(root) as live:
        yield live


def _stats(server: LiveServer, model: str) -> dict[str, Any]:
    return httpx.get(f"{server.http_url}/v2/models/{model}/stats", timeout=10).json()["model_stats"][0]


def test_the_object_form_of_dynamic_batching_is_applied_and_reported(server: LiveServer) -> None:
    http_client = triton_http.InferenceServerClient(server.http_address)
    grpc_client = triton_grpc.InferenceServerClient(server.grpc_url)
    slow = http_client.get_model_config("slow_digits")["dynamic_batching"]
    assert slow == {"max_queue_delay_microseconds": SLOW_DELAY_US, "preferred_batch_size": [4]}
    over_grpc = grpc_client.get_model_config("slow_digits").config.dynamic_batching
    assert list(over_grpc.preferred_batch_size) == [4]
    assert over_grpc.max_queue_delay_microseconds == SLOW_DELAY_US
    # `{}`: batching on, with no delay (it used to turn batching off).
    assert http_client.get_model_config("default_batching")["dynamic_batching"] == {
        "max_queue_delay_microseconds": 0
    }


def test_concurrent_requests_run_in_preferred_batches_each_charged_its_batch(server: LiveServer) -> None:
    """8 requests at once on a model preferring batches of 4: two batches of 4, neither waiting out
    the second of delay; the statistics count 8 requests' compute and 2 executions."""
    before = _stats(server, "slow_digits")
    url = f"{server.http_url}/v2/models/slow_digits/infer"
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: httpx.post(url, json={"inputs": [IMAGE]}, timeout=30), range(8)))
    assert all(answer.status_code == 200 for answer in answers)
    assert time.monotonic() - started < SLOW_DELAY_US / 1e6
    after = _stats(server, "slow_digits")
    batches = {entry["batch_size"]: entry["compute_infer"]["count"] for entry in after["batch_stats"]}
    assert batches == {4: 2}
    assert after["execution_count"] - before["execution_count"] == 2
    counts = {key: after["inference_stats"][key]["count"] for key in ("success", "compute_infer", "queue")}
    assert counts == {"success": 8, "compute_infer": 8, "queue": 8}


def test_a_request_timeout_expires_in_the_batchers_queue(server: LiveServer) -> None:
    """Triton's `timeout` (microseconds), tritonclient's `timeout=` and the X-Request-Timeout header
    (seconds) bound the wait of a tensor model's request: 408 / DEADLINE_EXCEEDED, not a late 200,
    and a failure in the statistics and metrics."""
    url = f"{server.http_url}/v2/models/slow_digits/infer"
    before = _stats(server, "slow_digits")["inference_stats"]["fail"]["count"]
    by_parameter = httpx.post(url, json={"inputs": [IMAGE], "parameters": {"timeout": 100_000}}, timeout=30)
    assert by_parameter.status_code == 408 and "timed out" in by_parameter.json()["error"]
    by_header = httpx.post(url, json={"inputs": [IMAGE]}, headers={"X-Request-Timeout": "0.1"}, timeout=30)
    assert by_header.status_code == 408 and set(by_header.json()) == {"error"}
    image = triton_grpc.InferInput("image", [1, 8, 8], "FP32")
    image.set_data_from_numpy(np.zeros((1, 8, 8), dtype=np.float32))
    with pytest.raises(InferenceServerException) as caught:
        triton_grpc.InferenceServerClient(server.grpc_url).infer("slow_digits", [image], timeout=100_000)
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert _stats(server, "slow_digits")["inference_stats"]["fail"]["count"] - before == 3
    metrics = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    assert 'inferd_kserve_requests_total{model="slow_digits",outcome="failure"} 3.0' in metrics
    # Time enough: answered after the delay.
    enough = httpx.post(url, json={"inputs": [IMAGE]}, headers={"X-Request-Timeout": "30"}, timeout=30)
    assert enough.status_code == 200
    bad = httpx.post(url, json={"inputs": [IMAGE]}, headers={"X-Request-Timeout": "soon"}, timeout=30)
    assert bad.status_code == 400 and "X-Request-Timeout" in bad.json()["error"]


def test_a_triton_layout_folder_is_listed_with_the_reason_it_does_not_load(server: LiveServer) -> None:
    reason = "no model.json; config.pbtxt is not read"
    http_client = triton_http.InferenceServerClient(server.http_address)
    index = {item["name"]: item for item in http_client.get_model_repository_index()}
    assert index["triton_style"] == {
        "name": "triton_style",
        "version": "1",
        "state": "UNAVAILABLE",
        "reason": reason,
    }
    grpc_client = triton_grpc.InferenceServerClient(server.grpc_url)
    grpc_index = {m.name: (m.state, m.reason) for m in grpc_client.get_model_repository_index().models}
    assert grpc_index["triton_style"] == ("UNAVAILABLE", reason)
    load = httpx.post(f"{server.http_url}/v2/repository/models/triton_style/load", timeout=30)
    assert load.status_code == 400 and reason in load.json()["error"]
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.load_model("triton_style")
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT" and reason in caught.value.message()
    ready = httpx.get(f"{server.http_url}/v2/models/triton_style/ready", timeout=10)
    assert ready.status_code == 503 and reason in ready.json()["error"]
    assert httpx.get(f"{server.http_url}/v2/health/ready", timeout=10).status_code == 200


def test_an_unknown_sampling_field_is_refused_by_name_on_every_path(server: LiveServer) -> None:
    url = f"{server.http_url}/v2/models/echo_llm"
    typo = {"text_input": "one two three", "parameters": {"max_token": 1}}
    for route in (
        "generate",
        "generate_stream",
    ):
        answer = httpx.post(f"{url}/{route}", json=typo, timeout=30)
        assert answer.status_code == 400 and "'max_token'" in answer.json()["error"], answer.text
    text = triton_grpc.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"one two"], dtype=object))
    grpc_client = triton_grpc.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.infer("echo_llm", [text], parameters={"max_token": 1})
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT" and "'max_token'" in caught.value.message()
    # Triton's own request parameters are no sampling fields: taken.
    result = grpc_client.infer("echo_llm", [text], parameters={"max_tokens": 1}, sequence_id=3, timeout=10**7)
    assert result.as_numpy("text_output")[0] == b"ONE"
