"""Model repository loading, the runtime registry, each built-in runtime, and the data plane's checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kserve_support import build_tiny_bert

from inferd.serving.config import ConfigError, parse_model_config
from inferd.serving.dataplane import DataPlane
from inferd.serving.errors import InvalidInputError, ModelNotFoundError, ModelNotReadyError
from inferd.serving.repository import load_repository
from inferd.serving.runtimes.registry import default_runtime_registry
from inferd.serving.tensor import InferRequest, RequestedOutput, Tensor

DOUBLER_CONFIG = {
    "runtime": "python_doubler",
    "max_batch_size": 4,
    "labels": ["small", "large"],
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [2]}],
}


class Doubler:
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"] * 2}


def _write_model(root: Path, folder: str, config: dict[str, Any]) -> Path:
    model_dir = root / folder
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.json").write_text(json.dumps(config))
    return model_dir


def _registry_with_doubler() -> Any:
    runtimes = default_runtime_registry()
    runtimes.register("python_doubler", lambda model_dir, config: Doubler(), platform="python")
    return runtimes


def test_config_defaults_and_metadata_shape() -> None:
    config = parse_model_config(DOUBLER_CONFIG, "doubler")
    assert config.name == "doubler" and config.version == "1" and config.batched
    assert config.metadata_shape(config.inputs[0]) == [-1, 2]


@pytest.mark.parametrize(
    "change",
    [
        {"name": "../escape"},
        {"name": ".hidden"},
        {"runtime": ""},
        {"max_batch_size": -1},
        {"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [2]}]},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [0]}]},
        {"labels": [1, 2]},
    ],
)
def test_invalid_configs_are_rejected(change: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        parse_model_config({**DOUBLER_CONFIG, **change}, "doubler")


def test_failed_models_are_listed_not_ready_with_the_reason(tmp_path: Path) -> None:
    _write_model(tmp_path, "doubler", DOUBLER_CONFIG)
    _write_model(tmp_path, "no_runtime", {**DOUBLER_CONFIG, "runtime": "llm"})
    _write_model(tmp_path, "missing_file", {**DOUBLER_CONFIG, "runtime": "onnx"})
    _write_model(
        tmp_path, "escape", {**DOUBLER_CONFIG, "runtime": "onnx", "artifact": "../doubler/model.json"}
    )
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "model.json").write_text("{")
    repository = load_repository(tmp_path, _registry_with_doubler())
    states = {entry.name: (entry.ready, entry.failure) for entry in repository}
    assert states["doubler"] == (True, None)
    assert "no runtime registered for 'llm'" in states["no_runtime"][1]
    assert "not found" in states["missing_file"][1]
    assert "outside the model folder" in states["escape"][1]
    assert "not valid JSON" in states["bad_json"][1]
    with pytest.raises(ModelNotReadyError, match="no runtime registered"):
        repository.get("no_runtime").require_ready()
    with pytest.raises(ModelNotFoundError):
        repository.get("../doubler")


def test_hf_runtimes_refuse_pickled_weights(tmp_path: Path) -> None:
    model_dir = build_tiny_bert(tmp_path / "pickled", "classification")
    # Replace the safetensors weights by a pickle: loading must fail instead of unpickling it.
    (model_dir / "model.safetensors").unlink()
    torch.save({}, model_dir / "pytorch_model.bin")
    _write_model(tmp_path, "pickled", {**_text_config("hf_sequence_classification"), "outputs": []})
    entry = next(iter(load_repository(tmp_path, default_runtime_registry())))
    assert not entry.ready and entry.failure


def _text_config(runtime: str) -> dict[str, Any]:
    return {
        "runtime": runtime,
        "max_batch_size": 8,
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1]}],
    }


async def test_data_plane_validates_before_running(tmp_path: Path) -> None:
    _write_model(tmp_path, "doubler", DOUBLER_CONFIG)
    plane = DataPlane(load_repository(tmp_path, _registry_with_doubler()))

    def request(*tensors: Tensor, outputs: list[RequestedOutput] | None = None) -> InferRequest:
        return InferRequest(inputs=list(tensors), outputs=outputs or [], id="r1")

    good = Tensor("x", "FP32", np.array([[1.0, 3.0]], dtype=np.float32))
    response = await plane.infer("doubler", None, request(good))
    assert response.id == "r1" and response.outputs[0].data.tolist() == [[2.0, 6.0]]
    classified = await plane.infer(
        "doubler", "1", request(good, outputs=[RequestedOutput("y", {"classification": 1})])
    )
    assert classified.outputs[0].data.tolist() == [[b"6.000000:1:large"]]
    bad_requests = [
        request(),
        request(Tensor("x", "FP64", np.zeros((1, 2)))),
        request(Tensor("x", "FP32", np.zeros((1, 3), dtype=np.float32))),
        request(Tensor("x", "FP32", np.zeros((5, 2), dtype=np.float32))),
        request(good, Tensor("z", "FP32", np.zeros((1, 2), dtype=np.float32))),
        request(good, outputs=[RequestedOutput("nope")]),
        request(good, outputs=[RequestedOutput("y", {"classification": 0})]),
    ]
    for bad in bad_requests:
        with pytest.raises(InvalidInputError):
            await plane.infer("doubler", None, bad)
    with pytest.raises(ModelNotFoundError):
        await plane.infer("doubler", "2", request(good))
    await plane.repository.close()


class _Scale2(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_torchscript_and_torch_export_runtimes(tmp_path: Path) -> None:
    config = {
        "max_batch_size": 4,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [3]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [3]}],
    }
    torch.jit.script(_Scale2()).save(
        str(_write_model(tmp_path, "scripted", {**config, "runtime": "torchscript"}) / "model.ts")
    )
    batch = torch.export.Dim("batch", max=4)
    program = torch.export.export(_Scale2(), (torch.ones(2, 3),), dynamic_shapes=({0: batch},))
    torch.export.save(
        program, str(_write_model(tmp_path, "exported", {**config, "runtime": "torch_export"}) / "model.pt2")
    )
    repository = load_repository(tmp_path, default_runtime_registry())
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for name in ("scripted", "exported"):
        entry = repository.get(name)
        assert entry.ready, entry.failure
        np.testing.assert_array_equal(entry.runtime.infer({"x": x})["y"], x * 2)


def test_hf_classification_and_embedding_runtimes(tmp_path: Path) -> None:
    build_tiny_bert(tmp_path / "classifier", "classification")
    _write_model(
        tmp_path,
        "classifier",
        {
            **_text_config("hf_sequence_classification"),
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [2]},
                {"name": "label", "datatype": "INT64", "shape": [1]},
            ],
        },
    )
    build_tiny_bert(tmp_path / "embedder", "embedding")
    _write_model(
        tmp_path,
        "embedder",
        {
            **_text_config("sentence_embedding"),
            "outputs": [
                {"name": "embedding", "datatype": "FP32", "shape": [16]},
                {"name": "token_count", "datatype": "INT64", "shape": [1]},
            ],
        },
    )
    repository = load_repository(tmp_path, default_runtime_registry())
    texts = np.array([[b"good movie"], [b"the movie is awful"]], dtype=object)
    classified = repository.get("classifier").runtime.infer({"text": texts})
    np.testing.assert_allclose(classified["probabilities"].sum(axis=1), 1.0, rtol=1e-6)
    assert classified["label"].tolist() == classified["probabilities"].argmax(axis=1, keepdims=True).tolist()
    embedded = repository.get("embedder").runtime.infer({"text": texts})
    np.testing.assert_allclose(np.linalg.norm(embedded["embedding"], axis=1), 1.0, rtol=1e-5)
    assert embedded["token_count"].ravel().tolist() == [4, 6]  # [CLS] ... [SEP]
    # A text longer than the encoder's 64 positions is cut there, not past them (max_length 128).
    long_text = np.array([[" ".join(["movie"] * 300).encode()]], dtype=object)
    long_embedded = repository.get("embedder").runtime.infer({"text": long_text})
    assert long_embedded["token_count"].ravel().tolist() == [64]
    assert repository.get("classifier").runtime.infer({"text": long_text})["label"].shape == (1, 1)


async def test_unloading_answers_the_queued_requests_first_and_added_models_stay(tmp_path: Path) -> None:
    import asyncio

    from inferd.serving.repository import ModelEntry

    _write_model(tmp_path, "doubler", {**DOUBLER_CONFIG, "dynamic_batching": {"max_queue_delay_ms": 200}})
    repository = load_repository(tmp_path, _registry_with_doubler())
    entry = repository.get("doubler")
    assert entry.batcher is not None
    queued = asyncio.ensure_future(entry.batcher.submit({"x": np.ones((1, 2), dtype=np.float32)}))
    await asyncio.sleep(0)  # queued, waiting out the batching delay
    await repository.unload("doubler")
    np.testing.assert_array_equal((await asyncio.wait_for(queued, 10))["y"], [[2.0, 2.0]])
    assert not repository.get("doubler").ready and repository.get("doubler").failure == "unloaded"
    assert (await repository.load("doubler")).ready
    repository.add(ModelEntry("served-llm", None, "inferd_llm", runtime=Doubler()))  # type: ignore[arg-type]
    for control in (repository.load, repository.unload):
        with pytest.raises(InvalidInputError, match="not loaded from a model repository folder"):
            await control("served-llm")
    await repository.close()


async def test_an_unload_during_a_load_closes_each_runtime_once(tmp_path: Path) -> None:
    import asyncio
    import time

    closed: list[int] = []

    class Closable(Doubler):
        def __init__(self, number: int) -> None:
            self.number = number

        def close(self) -> None:
            closed.append(self.number)

    made: list[Closable] = []

    def slow_load(model_dir: Path, config: Any) -> Closable:
        time.sleep(0.3 if made else 0)  # the reload takes a while
        made.append(Closable(len(made)))
        return made[-1]

    runtimes = default_runtime_registry()
    runtimes.register("python_doubler", slow_load, platform="python")
    _write_model(tmp_path, "doubler", DOUBLER_CONFIG)
    repository = load_repository(tmp_path, runtimes)
    reload = asyncio.ensure_future(repository.load("doubler"))
    await asyncio.sleep(0.05)  # the reload is under way
    await repository.unload("doubler")  # waits for it, then unloads what it loaded
    await reload
    assert sorted(closed) == [0, 1] and repository.get("doubler").failure == "unloaded"
