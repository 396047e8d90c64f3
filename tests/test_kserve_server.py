"""KServe v2 against a live server (REST and gRPC) with the real tritonclient: metadata, readiness,
the example models, FP16/BF16 raw contents, error codes, batching isolation and the LLM paths."""

from __future__ import annotations

import asyncio
import json
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from kserve_support import LiveServer, expected_fake_output, running_server
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from inferd.serving.config import read_model_config
from inferd.serving.runtimes.registry import default_runtime_registry

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
SENTENCES = [b"A wonderful, moving film with great acting.", b"Boring, predictable and far too long."]


def _write_config(model_dir: Path, config: dict[str, Any]) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.json").write_text(json.dumps(config))


def _fp16_doubler(model_dir: Path) -> None:
    """ONNX graph y = x + x on FP16: its data can only travel as raw contents over gRPC."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "double",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 4])],
    )
    _write_config(
        model_dir,
        {
            "runtime": "onnx",
            "max_batch_size": 8,
            "inputs": [{"name": "x", "datatype": "FP16", "shape": [4]}],
            "outputs": [{"name": "y", "datatype": "FP16", "shape": [4]}],
        },
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model_dir / "model.onnx")
    )


class _Halve(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / 2


def _bf16_halver(model_dir: Path) -> None:
    _write_config(
        model_dir,
        {
            "runtime": "torch_export",
            "inputs": [{"name": "x", "datatype": "BF16", "shape": [3]}],
            "outputs": [{"name": "y", "datatype": "BF16", "shape": [3]}],
        },
    )
    program = torch.export.export(_Halve(), (torch.ones(3, dtype=torch.bfloat16),))
    torch.export.save(program, str(model_dir / "model.pt2"))


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    for name in ("digits", "sentiment"):
        shutil.copytree(EXAMPLES / name, root / name)
    _fp16_doubler(root / "fp16_doubler")
    _bf16_halver(root / "bf16_halver")
    _write_config(root / "broken", {"runtime": "onnx", "inputs": [], "outputs": []})
    _write_config(root / "echo_llm", {"runtime": "llm"})
    shutil.copytree(EXAMPLES / "digits", root / "named_version")
    named = json.loads((root / "named_version" / "model.json").read_text())
    (root / "named_version" / "model.json").write_text(
        json.dumps({**named, "name": "named_version", "version": "v2"})
    )
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[LiveServer]:
    with running_server(repository) as live:
        yield live


@pytest.fixture(scope="module")
def http_client(server: LiveServer) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(server.http_address, concurrency=4)


@pytest.fixture(scope="module")
def grpc_client(server: LiveServer) -> triton_grpc.InferenceServerClient:
    return triton_grpc.InferenceServerClient(server.grpc_url)


def _direct(repository: Path, name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's runtime called in this process, without the server."""
    model_dir = repository / name
    return default_runtime_registry().load(model_dir, read_model_config(model_dir)).infer(inputs)


def _digit_images(count: int) -> np.ndarray:
    return np.random.default_rng(count).uniform(0, 16, size=(count, 8, 8)).astype(np.float32)


def test_health_and_server_metadata(http_client: Any, grpc_client: Any) -> None:
    assert http_client.is_server_live() and http_client.is_server_ready()
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    assert http_client.get_server_metadata()["name"] == "inferd"
    grpc_metadata = grpc_client.get_server_metadata()
    assert grpc_metadata.name == "inferd" and "binary_tensor_data" in grpc_metadata.extensions


def test_model_metadata(http_client: Any, grpc_client: Any) -> None:
    metadata = http_client.get_model_metadata("digits")
    assert metadata["platform"] == "onnxruntime_onnx" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 8, 8]}]
    grpc_metadata = grpc_client.get_model_metadata("sentiment", "1")
    assert [(t.name, t.datatype, list(t.shape)) for t in grpc_metadata.inputs] == [("text", "BYTES", [-1, 1])]
    assert [t.name for t in grpc_metadata.outputs] == ["probabilities", "label", "confidence"]


def test_readiness_and_repository_index(http_client: Any, grpc_client: Any) -> None:
    for name in ("digits", "sentiment", "fp16_doubler", "bf16_halver", "echo_llm"):
        assert http_client.is_model_ready(name) and grpc_client.is_model_ready(name)
    assert not http_client.is_model_ready("broken") and not grpc_client.is_model_ready("broken")
    index = {item["name"]: item for item in http_client.get_model_repository_index()}
    assert index["broken"]["state"] == "UNAVAILABLE" and "model.onnx" in index["broken"]["reason"]
    assert index["digits"]["state"] == "READY"


@pytest.mark.parametrize("binary_data", [False, True])
def test_digits_over_http_equals_the_runtime(http_client: Any, repository: Path, binary_data: bool) -> None:
    images = _digit_images(5)
    image_input = triton_http.InferInput("image", list(images.shape), "FP32")
    image_input.set_data_from_numpy(images, binary_data=binary_data)
    outputs = [
        triton_http.InferRequestedOutput(n, binary_data=binary_data) for n in ("probabilities", "label")
    ]
    result = http_client.infer("digits", [image_input], outputs=outputs, request_id="digits-1")
    direct = _direct(repository, "digits", {"image": images})
    assert result.get_response()["id"] == "digits-1"
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), direct["probabilities"], rtol=1e-5, atol=1e-7
    )
    np.testing.assert_array_equal(result.as_numpy("label"), direct["label"])


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_a_compressed_request_body_is_inflated(http_client: Any, repository: Path, compression: str) -> None:
    """Triton's HTTP client compresses the request with request_compression_algorithm."""
    images = _digit_images(2)
    image_input = triton_http.InferInput("image", list(images.shape), "FP32")
    image_input.set_data_from_numpy(images, binary_data=True)
    result = http_client.infer("digits", [image_input], request_compression_algorithm=compression)
    np.testing.assert_array_equal(
        result.as_numpy("label"), _direct(repository, "digits", {"image": images})["label"]
    )


def test_a_compressed_body_is_bounded_once_inflated_and_must_inflate(monkeypatch: pytest.MonkeyPatch) -> None:
    import gzip

    from inferd.server import decompression

    on_a_loop = []  # inflating a large body on the event loop would hold up every other request
    inflate = decompression._inflate

    def watched(*args: Any) -> bytes:
        try:
            asyncio.get_running_loop()
            on_a_loop.append(True)
        except RuntimeError:
            on_a_loop.append(False)
        return inflate(*args)

    monkeypatch.setattr(decompression, "_inflate", watched)

    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    from inferd.server.kserve.launch import build_app
    from inferd.serving.repository import ModelRepository

    app = build_app(ModelRepository([]), CollectorRegistry(), max_body_bytes=100_000)
    url = "/v2/repository/index"  # reads its JSON body: {"ready": true} lists, a string is refused

    def post(body: bytes, encoding: str) -> Any:
        return client.post(url, content=body, headers={"Content-Encoding": encoding})

    with TestClient(app) as client:
        bomb = gzip.compress(b"{" + b" " * 10_000_000 + b"}")  # 10 kB, inflating to 10 MB
        too_large = post(bomb, "gzip")
        assert (
            too_large.status_code == 413 and "inflates past the limit of 100000" in too_large.json()["error"]
        )
        false = post(b"{}", "gzip")
        assert false.status_code == 400 and "does not inflate" in false.json()["error"]
        cut = post(gzip.compress(b'{"ready": true}')[:-12], "gzip")
        assert cut.status_code == 400 and "truncated" in cut.json()["error"]
        other = post(b"{}", "br")
        assert other.status_code == 400 and "'br' is not supported" in other.json()["error"]
        # Inflated, the body reaches the route: raw deflate too, and gzip members one after another.
        raw = zlib.compressobj(wbits=-15)
        assert post(raw.compress(b'{"ready": true}') + raw.flush(), "deflate").json() == []
        members = post(gzip.compress(b'{"ready": ') + gzip.compress(b'"yes"}'), "gzip")
        assert members.status_code == 400 and "'ready' must be true or false" in members.json()["error"]
        assert post(b"", "gzip").json() == []  # an empty body stays empty
        assert post(gzip.compress(b'{"ready": true}') + b"\0" * 64, "gzip").json() == []  # zero padding
        empties = post(gzip.compress(b"") * 2000, "gzip")  # 40 kB of empty members
        assert empties.status_code == 400 and "more than 1024 gzip members" in empties.json()["error"]
        trailing = post(zlib.compress(b'{"ready": true}') + b"junk", "deflate")
        assert trailing.status_code == 400 and "4 bytes after its compressed data" in trailing.json()["error"]
    assert on_a_loop and not any(on_a_loop)  # in a worker thread each time


def test_digits_over_grpc_equals_the_runtime(grpc_client: Any, repository: Path) -> None:
    images = _digit_images(3)
    image_input = triton_grpc.InferInput("image", list(images.shape), "FP32")
    image_input.set_data_from_numpy(images)
    result = grpc_client.infer("digits", [image_input])
    direct = _direct(repository, "digits", {"image": images})
    for name in ("probabilities", "label", "confidence"):
        np.testing.assert_allclose(result.as_numpy(name), direct[name], rtol=1e-5, atol=1e-7)


def test_sentiment_labels_through_the_classification_extension(
    http_client: Any, grpc_client: Any, repository: Path
) -> None:
    texts = np.array([[s] for s in SENTENCES], dtype=object)
    direct = _direct(repository, "sentiment", {"text": texts})
    assert direct["label"].ravel().tolist() == [1, 0]

    http_input = triton_http.InferInput("text", [2, 1], "BYTES")
    http_input.set_data_from_numpy(texts, binary_data=False)
    http_result = http_client.infer(
        "sentiment",
        [http_input],
        outputs=[
            triton_http.InferRequestedOutput("probabilities", binary_data=False, class_count=1),
            triton_http.InferRequestedOutput("confidence", binary_data=False),
        ],
    )
    top = [entry.split(":") for entry in http_result.as_numpy("probabilities").ravel()]
    assert [label for _, _, label in top] == ["positive", "negative"]
    np.testing.assert_allclose([float(score) for score, _, _ in top], direct["confidence"].ravel(), rtol=1e-5)

    grpc_input = triton_grpc.InferInput("text", [2, 1], "BYTES")
    grpc_input.set_data_from_numpy(texts)
    grpc_result = grpc_client.infer("sentiment", [grpc_input])
    np.testing.assert_array_equal(grpc_result.as_numpy("label"), direct["label"])
    np.testing.assert_allclose(grpc_result.as_numpy("probabilities"), direct["probabilities"], rtol=1e-6)


def test_requested_outputs_are_checked_before_the_model_runs(server: LiveServer) -> None:
    """A bad classification parameter or an output asked for twice is a 400 before the request is
    queued: the model runs nothing for it (its execution count stays)."""
    url = f"{server.http_url}/v2/models/sentiment"
    text = {"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["fine"]}

    def executions() -> int:
        return int(httpx.get(f"{url}/stats").json()["model_stats"][0]["execution_count"])

    before = executions()
    for outputs, named in (
        ([{"name": "probabilities", "parameters": {"classification": k}}], "positive integer")
        for k in (0, -1, "2", True)
    ):
        response = httpx.post(f"{url}/infer", json={"inputs": [text], "outputs": outputs}, timeout=30)
        assert response.status_code == 400 and named in response.json()["error"], response.text
    twice = [{"name": "label"}, {"name": "label"}]
    response = httpx.post(f"{url}/infer", json={"inputs": [text], "outputs": twice}, timeout=30)
    assert response.status_code == 400 and "'label' is requested more than once" in response.json()["error"]
    assert executions() == before


def test_non_finite_floats_travel_in_json_as_triton_writes_them(http_client: Any, server: LiveServer) -> None:
    """Strict JSON has no NaN or infinity: as Triton does, they go as the literals NaN, Infinity
    and -Infinity both ways, which tritonclient (rapidjson) and Python's json read."""
    x = np.array([[np.nan, np.inf, -np.inf, 1.0], [0.5, 0.0, -2.0, 8.0]], dtype=np.float16)
    http_input = triton_http.InferInput("x", list(x.shape), "FP16")
    http_input.set_data_from_numpy(x, binary_data=False)
    output = triton_http.InferRequestedOutput("y", binary_data=False)
    np.testing.assert_array_equal(
        http_client.infer("fp16_doubler", [http_input], outputs=[output]).as_numpy("y"), x * 2
    )
    data = b"[NaN, Infinity, -Infinity, 1, 0.5, 0, -2, 8]"
    raw = b'{"inputs": [{"name": "x", "datatype": "FP16", "shape": [2, 4], "data": ' + data + b"}]}"
    response = httpx.post(f"{server.http_url}/v2/models/fp16_doubler/infer", content=raw, timeout=30)
    assert response.status_code == 200
    assert b"[NaN, Infinity, -Infinity, 2.0" in response.content
    np.testing.assert_array_equal(
        np.array(response.json()["outputs"][0]["data"], dtype=np.float16), (x * 2).ravel()
    )


def test_fp16_through_raw_contents(http_client: Any, grpc_client: Any) -> None:
    x = np.array([[0.5, -1.25, 3.0, 1000.0], [2.0, 0.0, -4.5, 0.125]], dtype=np.float16)
    grpc_input = triton_grpc.InferInput("x", list(x.shape), "FP16")
    grpc_input.set_data_from_numpy(x)
    grpc_output = grpc_client.infer("fp16_doubler", [grpc_input]).as_numpy("y")
    assert grpc_output.dtype == np.float16
    np.testing.assert_array_equal(grpc_output, x * 2)
    http_input = triton_http.InferInput("x", list(x.shape), "FP16")
    http_input.set_data_from_numpy(x, binary_data=True)
    np.testing.assert_array_equal(http_client.infer("fp16_doubler", [http_input]).as_numpy("y"), x * 2)


def test_bf16_through_raw_contents(grpc_client: Any) -> None:
    x = np.array([1.0, -3.0, 0.5], dtype=ml_dtypes.bfloat16)
    bf16_input = triton_grpc.InferInput("x", [3], "BF16")
    bf16_input.set_data_from_numpy(x)
    result = grpc_client.infer("bf16_halver", [bf16_input])
    output = result.as_numpy("y")
    assert output.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(output.astype(np.float32), x.astype(np.float32) / 2)


def _http_error(call: Any) -> str:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status())


def test_http_error_codes(http_client: Any, server: LiveServer) -> None:
    wrong_shape = triton_http.InferInput("image", [1, 4, 4], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 4, 4), dtype=np.float32))
    assert _http_error(lambda: http_client.infer("digits", [wrong_shape])) == "400"
    wrong_type = triton_http.InferInput("image", [1, 8, 8], "FP64")
    wrong_type.set_data_from_numpy(np.zeros((1, 8, 8), dtype=np.float64))
    assert _http_error(lambda: http_client.infer("digits", [wrong_type])) == "400"
    assert _http_error(lambda: http_client.get_model_metadata("no_such_model")) == "404"
    assert _http_error(lambda: http_client.get_model_metadata("broken")) == "503"

    def post(path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{server.http_url}{path}", json=body, timeout=30)

    missing_input = post("/v2/models/digits/infer", {"inputs": []})
    assert missing_input.status_code == 400 and "missing input 'image'" in missing_input.json()["error"]
    assert post("/v2/models/no_such_model/infer", {"inputs": []}).status_code == 404
    broken = post("/v2/models/broken/infer", {"inputs": []})
    assert broken.status_code == 503 and "not ready" in broken.json()["error"]
    assert post("/v2/models/digits/versions/7/infer", {"inputs": []}).status_code == 404


def _grpc_error(call: Any) -> str:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status())


def test_grpc_error_codes(grpc_client: Any) -> None:
    wrong_shape = triton_grpc.InferInput("image", [1, 64], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
    assert _grpc_error(lambda: grpc_client.infer("digits", [wrong_shape])) == "StatusCode.INVALID_ARGUMENT"
    fine = triton_grpc.InferInput("image", [1, 8, 8], "FP32")
    fine.set_data_from_numpy(np.zeros((1, 8, 8), dtype=np.float32))
    assert _grpc_error(lambda: grpc_client.infer("no_such_model", [fine])) == "StatusCode.NOT_FOUND"
    # A refusal quoting a long name is cut to fit the status trailer, which clients refuse past
    # 8 KiB (RESOURCE_EXHAUSTED); non-ASCII takes three bytes a byte there.
    for long_name in ("m" * 17_000, "é" * 9_000):
        assert _grpc_error(lambda n=long_name: grpc_client.get_model_metadata(n)) == "StatusCode.NOT_FOUND"
        assert _grpc_error(lambda n=long_name: grpc_client.infer(n, [fine])) == "StatusCode.NOT_FOUND"
    assert _grpc_error(lambda: grpc_client.infer("broken", [fine])) == "StatusCode.UNAVAILABLE"
    assert _grpc_error(lambda: grpc_client.get_model_metadata("broken")) == "StatusCode.UNAVAILABLE"


def test_nested_json_data_and_request_id(server: LiveServer, repository: Path) -> None:
    images = _digit_images(2)
    body = {
        "id": "nested-7",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [2, 8, 8], "data": images.tolist()}],
        "outputs": [{"name": "label"}],
    }
    response = httpx.post(f"{server.http_url}/v2/models/digits/infer", json=body, timeout=30).json()
    assert response["id"] == "nested-7" and response["model_name"] == "digits"
    (label,) = response["outputs"]
    assert label["shape"] == [2, 1]
    assert label["data"] == _direct(repository, "digits", {"image": images})["label"].ravel().tolist()


async def test_a_bad_request_among_concurrent_ones_fails_alone(server: LiveServer, repository: Path) -> None:
    images = _digit_images(8)
    expected = _direct(repository, "digits", {"image": images})["label"].ravel().tolist()

    def body(index: int) -> dict[str, Any]:
        shape = [1, 8, 7] if index == 3 else [1, 8, 8]  # request 3 is malformed
        data = images[index].ravel().tolist()[: 56 if index == 3 else 64]
        return {"inputs": [{"name": "image", "datatype": "FP32", "shape": shape, "data": data}]}

    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as client:
        before = (await client.get("/metrics")).text
        responses = await asyncio.gather(
            *(client.post("/v2/models/digits/infer", json=body(i)) for i in range(8))
        )
        metrics = (await client.get("/metrics")).text
    for index, response in enumerate(responses):
        if index == 3:
            assert response.status_code == 400
        else:
            label = next(o for o in response.json()["outputs"] if o["name"] == "label")
            assert label["data"] == [expected[index]]
    assert 'inferd_kserve_batch_requests_count{model="digits"}' in metrics
    # The HTTP layer's counts, by route template: seven answered, one refused.
    labels = {"handler": "/v2/models/{name}/infer", "method": "POST"}
    answered = _sample(metrics, "http_requests_total", {**labels, "status": "2xx"})
    assert answered - _sample(before, "http_requests_total", {**labels, "status": "2xx"}) == 7
    refused = _sample(metrics, "http_requests_total", {**labels, "status": "4xx"})
    assert refused - _sample(before, "http_requests_total", {**labels, "status": "4xx"}) == 1


def _sample(text: str, name: str, labels: dict[str, str]) -> float:
    """A sample's value in a /metrics text (0 where it is not there yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = (s for family in text_string_to_metric_families(text) for s in family.samples)
    return next((s.value for s in samples if s.name == name and s.labels == labels), 0.0)


def test_llm_text_input_over_grpc_and_http(http_client: Any, grpc_client: Any) -> None:
    prompt = np.array([b"hello there general kenobi"], dtype=object)
    grpc_input = triton_grpc.InferInput("text_input", [1], "BYTES")
    grpc_input.set_data_from_numpy(prompt)
    grpc_result = grpc_client.infer("echo_llm", [grpc_input], parameters={"max_tokens": 2})
    assert grpc_result.as_numpy("text_output").tolist() == [
        expected_fake_output("hello there general kenobi", 2).encode()
    ]
    http_input = triton_http.InferInput("text_input", [1], "BYTES")
    http_input.set_data_from_numpy(prompt, binary_data=True)
    http_result = http_client.infer("echo_llm", [http_input])
    assert http_result.as_numpy("text_output").tolist() == [b"HELLO THERE GENERAL KENOBI"]
    bad = triton_grpc.InferInput("text_input", [1], "BYTES")
    bad.set_data_from_numpy(prompt)
    status = _grpc_error(lambda: grpc_client.infer("echo_llm", [bad], parameters={"max_tokens": 0}))
    assert status == "StatusCode.INVALID_ARGUMENT"


def test_generate_and_generate_stream(server: LiveServer) -> None:
    url = f"{server.http_url}/v2/models/echo_llm"

    def counts() -> tuple[int, int, int]:
        stats = httpx.get(f"{url}/stats").json()["model_stats"][0]
        return stats["inference_count"], *(stats["inference_stats"][k]["count"] for k in ("success", "fail"))

    before = counts()
    generated = httpx.post(
        f"{url}/generate", json={"text_input": "one two three", "parameters": {"max_tokens": 2}}
    )
    assert generated.status_code == 200
    assert generated.json()["text_output"] == "ONE TWO" and generated.json()["finish_reason"] == "length"
    with httpx.stream(
        "POST", f"{url}/generate_stream", json={"text_input": "one two three"}, timeout=30
    ) as stream:
        assert stream.status_code == 200
        events = [
            json.loads(line[len("data: ") :]) for line in stream.iter_lines() if line.startswith("data: ")
        ]
    assert "".join(e["text_output"] for e in events) == "ONE TWO THREE"
    assert [e["text_output"] for e in events[:3]] == ["ONE", " TWO", " THREE"]
    assert events[-1]["finish_reason"] == "stop"
    bad = httpx.post(f"{url}/generate_stream", json={"text_input": "x", "temperature": -1})
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]
    not_json = httpx.post(f"{url}/generate", content=b"{text_input")
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]
    # The extension's requests are inference requests to the statistics: two done (the inferences
    # made), two failed (one its body, one its sampling fields).
    assert tuple(after - earlier for after, earlier in zip(counts(), before, strict=True)) == (2, 2, 2)
    not_llm = httpx.post(f"{server.http_url}/v2/models/digits/generate", json={"text_input": "x"})
    assert not_llm.status_code == 400


def test_llm_text_input_is_checked_like_any_model_input(server: LiveServer, grpc_client: Any) -> None:
    not_utf8 = triton_grpc.InferInput("text_input", [1], "BYTES")
    not_utf8.set_data_from_numpy(np.array([b"\xff\xfe bad"], dtype=object))
    assert _grpc_error(lambda: grpc_client.infer("echo_llm", [not_utf8])) == "StatusCode.INVALID_ARGUMENT"
    url = f"{server.http_url}/v2/models/echo_llm/infer"
    text = {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hello"]}
    for body, named in (
        ({"inputs": [text], "outputs": [{"name": "nope"}]}, "nope"),
        ({"inputs": [text, {"name": "junk", "datatype": "INT32", "shape": [1], "data": [1]}]}, "junk"),
        ({"inputs": [text], "outputs": [{"name": "text_output", "parameters": {"classification": 1}}]},
         "classification"),
    ):  # fmt: skip
        response = httpx.post(url, json=body, timeout=30)
        assert response.status_code == 400 and named in response.json()["error"], response.text


def test_deeply_nested_json_is_a_400(server: LiveServer) -> None:
    nested = "[" * 100_000 + "]" * 100_000
    infer = '{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": ' + nested + "}]}"
    # An integer past Python's 4,300-digit limit: its JSON reader raises a plain ValueError (a 500).
    digits = '{"id": ' + "1" * 5000 + ', "inputs": []}'
    for path, body in (
        ("digits/infer", infer),
        ("echo_llm/generate", '{"text_input": ' + nested + "}"),
        ("digits/infer", digits),
        ("echo_llm/generate", '{"text_input": ' + "1" * 5000 + "}"),
    ):
        response = httpx.post(f"{server.http_url}/v2/models/{path}", content=body, timeout=30)
        assert response.status_code == 400 and "not valid JSON" in response.json()["error"], response.text


def test_unknown_v2_routes_and_methods_answer_in_the_v2_error_shape(server: LiveServer) -> None:
    missing = httpx.post(f"{server.http_url}/v2/models/digits/explain", timeout=30)
    assert missing.status_code == 404 and "Not Found" in missing.json()["error"]
    wrong_method = httpx.get(f"{server.http_url}/v2/models/digits/infer", timeout=30)
    assert wrong_method.status_code == 405 and "Method Not Allowed" in wrong_method.json()["error"]
    assert wrong_method.headers["allow"] == "POST"


def test_grpc_refuses_typed_and_raw_contents_together(server: LiveServer) -> None:
    import grpc
    from tritonclient.grpc import service_pb2 as pb2  # Triton's proto: the same v2 messages
    from tritonclient.grpc import service_pb2_grpc as pb2_grpc

    image = _digit_images(1).astype(np.float32)
    request = pb2.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="image", datatype="FP32", shape=[1, 8, 8])
    tensor.contents.fp32_contents.extend(image.ravel().tolist())
    request.raw_input_contents.append(image.tobytes())
    with grpc.insecure_channel(server.grpc_url) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in str(caught.value.details())


def test_the_classic_model_launcher_limits_the_body_size(repository: Path) -> None:
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    from inferd.server.kserve.launch import build_app
    from inferd.serving.repository import ModelRepository

    app = build_app(ModelRepository([]), CollectorRegistry(), max_body_bytes=1000)
    with TestClient(app) as client:
        response = client.post(
            "/v2/models/digits/infer", content=b"{" + b" " * 2000 + b"}", headers={"X-Request-Id": "k-1"}
        )
    assert response.status_code == 413 and "error" in response.json()
    assert response.headers["x-request-id"] == "k-1"  # a client's id comes back, refusals included


def test_models_load_and_unload_while_the_server_runs(
    http_client: Any, server: LiveServer, repository: Path
) -> None:
    image = triton_http.InferInput("image", [1, 8, 8], "FP32")
    image.set_data_from_numpy(_digit_images(1).astype(np.float32))
    expected = _direct(repository, "digits", {"image": _digit_images(1)})["label"].ravel().tolist()

    def label(model: str) -> list[int]:
        return http_client.infer(model, [image]).as_numpy("label").ravel().tolist()

    def state(model: str) -> dict[str, str]:
        return next(m for m in http_client.get_model_repository_index() if m["name"] == model)

    # A folder added after start-up loads by name.
    shutil.copytree(repository / "digits", repository / "late_digits")
    config_file = repository / "late_digits" / "model.json"
    _write_config(repository / "late_digits", {**json.loads(config_file.read_text()), "name": "late_digits"})
    with pytest.raises(InferenceServerException):
        label("late_digits")
    http_client.load_model("late_digits")
    assert label("late_digits") == expected and state("late_digits")["state"] == "READY"
    # A reload that fails leaves the loaded model serving.
    good_config = config_file.read_text()
    config_file.write_text("{not json")
    assert _http_error(lambda: http_client.load_model("late_digits")) == "400"
    assert label("late_digits") == expected
    config_file.write_text(good_config)
    http_client.unload_model("late_digits")
    assert state("late_digits") == {
        "name": "late_digits",
        "version": "1",
        "state": "UNAVAILABLE",
        "reason": "unloaded",
    }
    assert _http_error(lambda: label("late_digits")) == "503"
    http_client.load_model("late_digits")
    assert label("late_digits") == expected
    # Unknown folders, models that fail to load and unsupported overrides are errors.
    assert _http_error(lambda: http_client.load_model("no_such_model")) == "404"
    assert _http_error(lambda: http_client.unload_model("no_such_model")) == "404"
    assert _http_error(lambda: http_client.load_model("broken")) == "400"
    assert _http_error(lambda: http_client.load_model("digits", config='{"max_batch_size": 1}')) == "400"


def test_models_load_and_unload_over_grpc(grpc_client: Any, server: LiveServer, repository: Path) -> None:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    image = triton_grpc.InferInput("image", [1, 8, 8], "FP32")
    image.set_data_from_numpy(_digit_images(1).astype(np.float32))
    expected = _direct(repository, "digits", {"image": _digit_images(1)})["label"].ravel().tolist()

    def label(model: str) -> list[int]:
        return grpc_client.infer(model, [image]).as_numpy("label").ravel().tolist()

    def index() -> dict[str, Any]:
        models = grpc_client.get_model_repository_index().models
        return {m.name: (m.version, m.state, m.reason) for m in models}

    shutil.copytree(repository / "digits", repository / "grpc_digits")
    config_file = repository / "grpc_digits" / "model.json"
    _write_config(repository / "grpc_digits", {**json.loads(config_file.read_text()), "name": "grpc_digits"})
    assert _grpc_error(lambda: label("grpc_digits")) == "StatusCode.NOT_FOUND"
    grpc_client.load_model("grpc_digits")
    assert label("grpc_digits") == expected and index()["grpc_digits"] == ("1", "READY", "")
    grpc_client.unload_model("grpc_digits", unload_dependents=True)
    assert index()["grpc_digits"] == ("1", "UNAVAILABLE", "unloaded")
    assert _grpc_error(lambda: label("grpc_digits")) == "StatusCode.UNAVAILABLE"
    grpc_client.load_model("grpc_digits")
    assert label("grpc_digits") == expected
    # The same refusals as over REST, in gRPC's codes.
    assert _grpc_error(lambda: grpc_client.load_model("no_such_model")) == "StatusCode.NOT_FOUND"
    assert _grpc_error(lambda: grpc_client.unload_model("no_such_model")) == "StatusCode.NOT_FOUND"
    assert _grpc_error(lambda: grpc_client.load_model("broken")) == "StatusCode.INVALID_ARGUMENT"
    overridden = lambda: grpc_client.load_model("digits", config='{"max_batch_size": 1}')  # noqa: E731
    assert _grpc_error(overridden) == "StatusCode.INVALID_ARGUMENT"
    # `ready` lists only the models that serve; a named repository is refused, as Triton does.
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ready = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True)).models
        assert "digits" in {m.name for m in ready} and "broken" not in {m.name for m in ready}
        assert all(m.state == "READY" for m in ready)
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(repository_name="other"))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_repository_index_over_rest_takes_ready(server: LiveServer) -> None:
    every = httpx.post(f"{server.http_url}/v2/repository/index", timeout=30).json()
    ready = httpx.post(f"{server.http_url}/v2/repository/index", json={"ready": True}, timeout=30).json()
    assert {m["name"] for m in ready} == {m["name"] for m in every if m["state"] == "READY"}
    assert "broken" in {m["name"] for m in every} and "broken" not in {m["name"] for m in ready}
    refused = httpx.post(f"{server.http_url}/v2/repository/index", json={"ready": "yes"}, timeout=30)
    assert refused.status_code == 400 and "'ready'" in refused.json()["error"]


def test_the_timeout_header_and_parameter_follow_triton(server: LiveServer) -> None:
    from inferd.serving.generation import generation_params

    assert generation_params({"timeout": 0}).timeout_s is None  # Triton's 0: no timeout
    assert generation_params({"timeout": 250_000}).timeout_s == 0.25  # microseconds
    # A tensor model's request takes it too (its wait in the batcher's queue): a bad one is a 400.
    image = {"name": "image", "datatype": "FP32", "shape": [1, 8, 8], "data": [0.0] * 64}
    url = f"{server.http_url}/v2/models/digits/infer"
    for header, status in (("soon", 400), ("30", 200)):
        response = httpx.post(
            url, json={"inputs": [image]}, headers={"X-Request-Timeout": header}, timeout=30
        )
        assert response.status_code == status, response.text


def test_model_configuration_and_statistics_extensions(
    http_client: Any, grpc_client: Any, server: LiveServer
) -> None:
    """Triton's configuration and statistics extensions, as tritonclient reads them over REST and
    gRPC (the same answers: perf_analyzer reads the configuration over gRPC by default)."""
    for name in ("digits", "echo_llm"):
        rest = http_client.get_model_config(name)
        grpc = grpc_client.get_model_config(name, as_json=True)["config"]
        assert grpc["name"] == rest["name"] and grpc["input"] == [
            {**t, "dims": [str(d) for d in t["dims"]]}
            for t in rest["input"]  # int64 in JSON: text
        ]
        assert grpc.get("model_transaction_policy", {}).get("decoupled", False) == (name == "echo_llm")
    assert grpc_client.get_model_config("digits").config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert http_client.get_model_config("digits")["version_policy"] == {"specific": {"versions": [1]}}
    # A version that is no number (Triton's are) has no version policy, over either transport.
    assert "version_policy" not in http_client.get_model_config("named_version")
    assert grpc_client.get_model_config("named_version").config.name == "named_version"
    with pytest.raises(InferenceServerException) as missing:
        grpc_client.get_model_config("broken")
    assert missing.value.status() == "StatusCode.UNAVAILABLE"
    config = http_client.get_model_config("digits")
    assert config["max_batch_size"] == 64 and config["dynamic_batching"] == {
        "max_queue_delay_microseconds": 2000
    }
    assert config["input"] == [{"name": "image", "data_type": "TYPE_FP32", "dims": [8, 8]}]
    assert [o["name"] for o in config["output"]] == ["probabilities", "label", "confidence"]
    assert config["model_transaction_policy"] == {"decoupled": False}
    llm = http_client.get_model_config("echo_llm")
    optional = {tensor["name"] for tensor in llm["input"] if tensor.get("optional")}
    assert llm["model_transaction_policy"] == {"decoupled": True}
    assert {"stream", "sampling_parameters", "return_finish_reason"} <= optional
    assert llm["input"][0] == {"name": "text_input", "data_type": "TYPE_STRING", "dims": [1]}

    def stats() -> dict[str, Any]:
        return http_client.get_inference_statistics("digits")["model_stats"][0]

    before = stats()
    image = triton_http.InferInput("image", [3, 8, 8], "FP32")
    image.set_data_from_numpy(_digit_images(3))
    for _ in range(2):
        http_client.infer("digits", [image])
    wrong = triton_http.InferInput("image", [1, 4, 4], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 4, 4), dtype=np.float32))
    with pytest.raises(InferenceServerException):
        http_client.infer("digits", [wrong])
    # Refused by the REST codec (its data does not fill its shape): a failure all the same.
    short = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 8, 8], "data": [0.0] * 10}]}
    assert httpx.post(f"{server.http_url}/v2/models/digits/infer", json=short).status_code == 400
    after = stats()
    counts = after["inference_stats"]
    assert after["inference_count"] - before["inference_count"] == 6
    assert counts["success"]["count"] - before["inference_stats"]["success"]["count"] == 2
    assert counts["fail"]["count"] - before["inference_stats"]["fail"]["count"] == 2
    assert after["execution_count"] - before["execution_count"] == 2  # one runtime call a request here
    assert counts["queue"]["count"] - before["inference_stats"]["queue"]["count"] == 2
    assert counts["success"]["ns"] > before["inference_stats"]["success"]["ns"]
    assert counts["compute_infer"]["count"] - before["inference_stats"]["compute_infer"]["count"] == 2
    assert counts["compute_infer"]["ns"] > before["inference_stats"]["compute_infer"]["ns"]
    assert 3 in {entry["batch_size"] for entry in after["batch_stats"]} and after["last_inference"] > 0
    llm_before = http_client.get_inference_statistics("echo_llm")["model_stats"][0]
    text = triton_http.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"one two"], dtype=object))
    http_client.infer("echo_llm", [text])
    llm_after = http_client.get_inference_statistics("echo_llm")["model_stats"][0]
    # A generation is one inference and one execution (its engine batches on its own).
    assert llm_after["inference_count"] - llm_before["inference_count"] == 1
    assert llm_after["execution_count"] - llm_before["execution_count"] == 1
    over_grpc = grpc_client.get_inference_statistics("digits").model_stats[0]
    assert (
        over_grpc.inference_count == after["inference_count"]
        and over_grpc.execution_count == after["execution_count"]
    )
    assert over_grpc.inference_stats.success.count == counts["success"]["count"]
    everyone = {entry["name"] for entry in http_client.get_inference_statistics()["model_stats"]}
    assert {"digits", "sentiment", "echo_llm"} <= everyone and "broken" not in everyone
    with pytest.raises(InferenceServerException):
        http_client.get_inference_statistics("broken")


def test_grpc_names_the_contents_field_a_datatype_takes() -> None:
    """An FP32 input's values sent in int64_contents would read as no values at all."""
    from tritonclient.grpc import service_pb2 as pb2

    from inferd.server.kserve.grpc_codec import request_from_proto
    from inferd.serving.errors import InvalidInputError

    request = pb2.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="image", datatype="FP32", shape=[1, 2])
    tensor.contents.int64_contents.extend([1, 2])
    with pytest.raises(InvalidInputError, match="FP32 contents go in fp32_contents, not int64_contents"):
        request_from_proto(request)


def test_values_a_client_can_send_but_not_get_back_are_400s(server: LiveServer) -> None:
    """Found by fuzzing (each was a 500): a datatype that is no string, a BYTES element with a lone
    surrogate's escape, a timeout of more digits than a float holds."""
    url = f"{server.http_url}/v2/models/echo_llm"

    def text(datatype: str, data: str) -> str:
        return '{"name": "text_input", "datatype": ' + datatype + ', "shape": [1], "data": [' + data + "]}"

    huge = "9" * 311
    hi = text('"BYTES"', '"hi"')
    for path, body, named in (
        ("infer", '{"inputs": [' + text("[]", '"hi"') + "]}", "datatype"),
        ("infer", '{"inputs": [' + text('"BYTES"', '"\\ud800"') + "]}", "lone surrogate"),
        ("infer", '{"inputs": [' + hi + '], "parameters": {"timeout": ' + huge + "}}", "timeout"),
        ("generate", '{"text_input": "hi", "timeout": ' + huge + "}", "timeout"),
    ):  # fmt: skip
        response = httpx.post(f"{url}/{path}", content=body, timeout=30)
        assert response.status_code == 400 and named in response.json()["error"], response.text
