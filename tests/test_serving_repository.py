"""Model repository loading, the runtime registry, each built-in runtime, and the data plane's checks."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kserve_support import build_tiny_bert

from inferd.server.kserve.rest import decodes_off_loop
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


async def test_a_large_body_is_decoded_off_the_event_loop(tmp_path: Path) -> None:
    """60 MB of small BYTES elements took 9.5 s to decode, and on the event loop every other
    request waited; a large body (every gRPC message, a REST body from 1 MiB on or naming a
    shared memory region) is decoded on a worker thread, and a refusal there still counts as the
    model's failed request."""
    _write_model(tmp_path, "doubler", DOUBLER_CONFIG)
    plane = DataPlane(load_repository(tmp_path, _registry_with_doubler()))
    loop_thread = threading.get_ident()
    small = await plane.decoded("doubler", None, threading.get_ident, off_loop=False)
    large = await plane.decoded("doubler", None, threading.get_ident, off_loop=True)
    assert small == loop_thread and large != loop_thread
    assert not decodes_off_loop(b'{"inputs": []}')
    assert decodes_off_loop(b"x" * (1 << 20))
    assert decodes_off_loop(b'{"inputs": [{"parameters": {"shared_memory_region": "r"}}]}')

    def refused() -> None:
        raise InvalidInputError("not this")

    with pytest.raises(InvalidInputError, match="not this"):
        await plane.decoded("doubler", None, refused, off_loop=True)
    assert plane.repository.get("doubler").stats.fail.count == 1
    await plane.repository.close()


async def test_a_stream_request_its_checks_refuse_counts_as_failed(tmp_path: Path) -> None:
    """A stream's request refused for its `stream` parameter was answered with an error but
    counted nowhere, where the unary call counts it as the model's failed request."""
    _write_model(tmp_path, "doubler", DOUBLER_CONFIG)
    plane = DataPlane(load_repository(tmp_path, _registry_with_doubler()))
    x = Tensor("x", "FP32", np.array([[1.0, 3.0]], dtype=np.float32))
    with pytest.raises(InvalidInputError, match="stream"):
        async for _ in plane.infer_stream("doubler", None, InferRequest([x], parameters={"stream": "maybe"})):
            pass
    assert plane.repository.get("doubler").stats.fail.count == 1
    await plane.repository.close()


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

    _write_model(
        tmp_path, "doubler", {**DOUBLER_CONFIG, "dynamic_batching": {"max_queue_delay_microseconds": 200_000}}
    )
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


EXAMPLE_MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"
DIGITS_OUTPUTS = [
    {"name": "probabilities", "datatype": "FP32", "shape": [10]},
    {"name": "label", "datatype": "INT64", "shape": [1]},
    {"name": "confidence", "datatype": "FP32", "shape": [1]},
]


def test_dynamic_batching_takes_triton_object_form() -> None:
    """`{}` turns batching on with the defaults (it used to turn it off), the object's delay is the
    queue delay (it used to be dropped), and its preferred sizes are kept."""
    on = parse_model_config({**DOUBLER_CONFIG, "dynamic_batching": {}}, "doubler")
    assert on.dynamic_batching and on.max_queue_delay_ms == 0.0 and on.preferred_batch_sizes == ()
    triton = {"max_queue_delay_microseconds": 200_000, "preferred_batch_size": [4, 2]}
    tuned = parse_model_config({**DOUBLER_CONFIG, "dynamic_batching": triton}, "doubler")
    assert tuned.dynamic_batching and tuned.max_queue_delay_ms == 200.0
    assert tuned.preferred_batch_sizes == (2, 4)
    # protobuf's JSON form of a uint64 (what Triton's configuration extension writes) is text.
    as_text = {"dynamic_batching": {"max_queue_delay_microseconds": "1500"}}
    assert parse_model_config({**DOUBLER_CONFIG, **as_text}, "d").max_queue_delay_ms == 1.5
    assert not parse_model_config({**DOUBLER_CONFIG, "dynamic_batching": False}, "d").dynamic_batching


@pytest.mark.parametrize(
    ("dynamic_batching", "named"),
    [
        ("false", "must be true, false or an object"),  # a string used to turn batching on
        (1, "must be true, false or an object"),
        ({"max_queue_delay_ms": 200}, "'max_queue_delay_ms'"),
        ({"priority_levels": 2}, "'priority_levels'"),
        ({"default_queue_policy": {"max_queue_size": 1}}, "'default_queue_policy'"),
        ({"max_queue_delay_microseconds": -1}, "max_queue_delay_microseconds"),
        ({"preferred_batch_size": [8]}, "preferred_batch_size"),  # above max_batch_size (4)
        ({"preferred_batch_size": 2}, "preferred_batch_size"),
    ],
)
def test_dynamic_batching_refuses_what_it_cannot_apply(dynamic_batching: object, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        parse_model_config({**DOUBLER_CONFIG, "dynamic_batching": dynamic_batching}, "doubler")


def test_the_queue_delay_is_given_once() -> None:
    both = {"max_queue_delay_ms": 2, "dynamic_batching": {"max_queue_delay_microseconds": 2000}}
    with pytest.raises(ConfigError, match="once"):
        parse_model_config({**DOUBLER_CONFIG, **both}, "doubler")


@pytest.mark.parametrize(
    "extra",
    [
        {"input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [2]}]},
        {"output": []},
        {"instance_group": [{"count": 2, "kind": "KIND_GPU"}]},
        {"default_queue_policy": {"default_timeout_microseconds": 1000, "max_queue_size": 1}},
        {"max_queue_size": 1},
        {"priority_levels": 2},
        {"version_policy": {"latest": {"num_versions": 2}}},
        {"response_cache": {"enable": True}},
    ],
)
def test_unknown_top_level_keys_are_refused(extra: dict[str, Any]) -> None:
    (key,) = extra
    with pytest.raises(ConfigError, match=f"'{key}'.*supported: name, runtime"):
        parse_model_config({**DOUBLER_CONFIG, **extra}, "doubler")


def test_tritons_key_names_get_model_jsons_spelling_in_the_error() -> None:
    with pytest.raises(ConfigError, match="model.json spells 'input' as 'inputs'"):
        parse_model_config({**DOUBLER_CONFIG, "input": []}, "doubler")


@pytest.mark.parametrize(
    "extra",
    [{"reshape": {"shape": [2]}}, {"optional": True}, {"dims": [2]}, {"is_shape_tensor": False}],
)
def test_unknown_tensor_keys_are_refused(extra: dict[str, Any]) -> None:
    (key,) = extra
    spec = {"name": "x", "datatype": "FP32", "shape": [2], **extra}
    with pytest.raises(
        ConfigError, match=f"inputs\\[0\\] has unsupported key\\(s\\) '{key}'.*name, datatype, shape"
    ):
        parse_model_config({**DOUBLER_CONFIG, "inputs": [spec]}, "doubler")


def test_an_unknown_key_leaves_the_model_unavailable_with_the_reason(tmp_path: Path) -> None:
    _write_model(tmp_path, "queued", {**DOUBLER_CONFIG, "default_queue_policy": {"max_queue_size": 1}})
    index = DataPlane(load_repository(tmp_path, _registry_with_doubler())).repository_index()
    assert index[0]["state"] == "UNAVAILABLE" and "'default_queue_policy'" in index[0]["reason"]


def test_every_example_model_configuration_is_valid() -> None:
    folders = sorted(path.parent for path in EXAMPLE_MODELS.glob("*/model.json"))
    assert folders
    for folder in folders:
        config = parse_model_config(json.loads((folder / "model.json").read_text()), folder.name)
        assert config.dynamic_batching and config.max_queue_delay_ms == 2.0


def _digits_folder(root: Path, name: str, **changes: Any) -> Path:
    """A copy of the example digits model whose model.json has ``changes``."""
    import shutil

    folder = root / name
    shutil.copytree(EXAMPLE_MODELS / "digits", folder)
    config = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**config, "name": name, **changes}))
    return folder


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (
            {"outputs": [{**DIGITS_OUTPUTS[0], "datatype": "INT64"}]},
            "output 'probabilities': the configuration declares INT64, the ONNX graph has FP32",
        ),
        (
            {"outputs": [{**DIGITS_OUTPUTS[0], "shape": [5]}]},
            "output 'probabilities': the configuration declares shape [5]",
        ),
        (
            {"inputs": [{"name": "picture", "datatype": "FP32", "shape": [8, 8]}]},
            "the ONNX graph needs inputs ['image']",
        ),
        (
            {"inputs": [{"name": "image", "datatype": "FP32", "shape": [64]}]},
            "input 'image': the configuration declares shape [64]",
        ),
        (
            {"max_batch_size": 0},  # the graph's first dimension is then no batch dimension
            "input 'image': the configuration declares shape [8, 8], the ONNX graph has [-1, 8, 8]",
        ),
    ],
)
def test_onnx_models_whose_configuration_disagrees_with_the_graph_do_not_load(
    tmp_path: Path, changes: dict[str, Any], reason: str
) -> None:
    _digits_folder(tmp_path, "digits_changed", **changes)
    entry = load_repository(tmp_path, default_runtime_registry()).get("digits_changed")
    assert not entry.ready and entry.failure is not None and reason in entry.failure, entry.failure


def test_an_onnx_model_matching_its_graph_loads_with_a_narrower_variable_dimension(tmp_path: Path) -> None:
    _digits_folder(tmp_path, "digits")
    assert load_repository(tmp_path, default_runtime_registry()).get("digits").ready


class _Liar:
    """Answers a float where its configuration declares INT64, or one value too many a row."""

    def __init__(self, wide: bool) -> None:
        self._wide = wide

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        if self._wide:
            return {"y": np.concatenate([x, x], axis=1).astype(np.int64)}
        return {"y": x * 2.5}


@pytest.mark.parametrize(
    ("wide", "named"),
    [
        (False, "'y' is float32 but the configuration declares INT64"),
        (True, "'y' has shape [1, 4] but the configuration declares [-1, 2]"),
    ],
)
async def test_an_output_unlike_its_declaration_is_an_internal_error_not_a_cast(
    tmp_path: Path, wide: bool, named: str
) -> None:
    from inferd.serving.errors import InferenceError

    runtimes = default_runtime_registry()
    runtimes.register("liar", lambda model_dir, config: _Liar(wide), platform="python")
    outputs = [{"name": "y", "datatype": "INT64", "shape": [2]}]
    _write_model(tmp_path, "liar", {**DOUBLER_CONFIG, "runtime": "liar", "outputs": outputs})
    plane = DataPlane(load_repository(tmp_path, runtimes))
    request = InferRequest([Tensor("x", "FP32", np.array([[1.0, 3.0]], dtype=np.float32))])
    with pytest.raises(InferenceError, match=re.escape(named)) as caught:
        await plane.infer("liar", None, request)
    assert not isinstance(caught.value, InvalidInputError)  # the model's fault: a 500, not a 400
    assert plane.repository.get("liar").stats.fail.count == 1
    await plane.repository.close()


def test_a_folder_without_model_json_is_listed_unavailable_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_model(tmp_path, "doubler", DOUBLER_CONFIG)
    (tmp_path / "triton_style" / "1").mkdir(parents=True)
    (tmp_path / "triton_style" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\n')
    (tmp_path / "empty").mkdir()
    (tmp_path / ".hidden").mkdir()
    with caplog.at_level("WARNING", logger="inferd.serving.repository"):
        repository = load_repository(tmp_path, _registry_with_doubler())
    index = {item["name"]: item for item in DataPlane(repository).repository_index()}
    assert index["triton_style"] == {
        "name": "triton_style",
        "version": "1",
        "state": "UNAVAILABLE",
        "reason": "no model.json; config.pbtxt is not read",
    }
    assert index["empty"]["reason"] == "no model.json" and ".hidden" not in index
    assert index["doubler"]["state"] == "READY" and repository.unready_reason() is None
    assert "'triton_style' is not loaded: no model.json; config.pbtxt is not read" in caplog.text


async def test_loading_a_folder_without_model_json_says_why(tmp_path: Path) -> None:
    (tmp_path / "triton_style").mkdir()
    (tmp_path / "triton_style" / "config.pbtxt").write_text("")
    repository = load_repository(tmp_path, _registry_with_doubler())
    with pytest.raises(InvalidInputError, match="no model.json; config.pbtxt is not read"):
        await repository.load("triton_style")
    with pytest.raises(ModelNotFoundError, match="no model folder 'elsewhere'"):
        await repository.load("elsewhere")
    # Given a model.json, the same folder loads.
    _write_model(tmp_path, "triton_style", DOUBLER_CONFIG)
    assert (await repository.load("triton_style")).ready
    await repository.close()


def test_a_served_model_takes_the_name_of_a_folder_without_model_json(tmp_path: Path) -> None:
    from inferd.serving.repository import ModelEntry

    (tmp_path / "chat").mkdir()  # say, the served LLM's own weights folder
    _write_model(tmp_path, "doubler", DOUBLER_CONFIG)
    repository = load_repository(tmp_path, _registry_with_doubler())
    repository.add(ModelEntry("chat", None, "inferd_llm", runtime=Doubler()))  # type: ignore[arg-type]
    assert repository.get("chat").ready
    with pytest.raises(ValueError, match="already in the repository"):
        repository.add(ModelEntry("doubler", None, "inferd_llm", runtime=Doubler()))  # type: ignore[arg-type]


async def test_triton_timeout_bounds_a_tensor_requests_wait_and_counts_as_a_failure(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from inferd.serving.errors import RequestTimedOutError
    from inferd.serving.metrics import ServingMetrics

    registry = CollectorRegistry()
    _write_model(tmp_path, "slow", {**DOUBLER_CONFIG, "max_queue_delay_ms": 300})
    plane = DataPlane(load_repository(tmp_path, _registry_with_doubler(), ServingMetrics(registry)))
    x = Tensor("x", "FP32", np.array([[1.0, 3.0]], dtype=np.float32))
    with pytest.raises(RequestTimedOutError):
        await plane.infer("slow", None, InferRequest([x], parameters={"timeout": 50_000}))  # microseconds
    stats = plane.repository.get("slow").stats
    assert (stats.fail.count, stats.success.count, stats.execution_count) == (1, 0, 0)
    failures = registry.get_sample_value(
        "inferd_kserve_requests_total", {"model": "slow", "outcome": "failure"}
    )
    assert failures == 1
    # Time enough, or none (Triton's 0): answered.
    for timeout in (5_000_000, 0):
        response = await plane.infer("slow", None, InferRequest([x], parameters={"timeout": timeout}))
        assert response.outputs[0].data.tolist() == [[2.0, 6.0]]
    with pytest.raises(InvalidInputError, match="timeout"):
        await plane.infer("slow", None, InferRequest([x], parameters={"timeout": "soon"}))
    await plane.repository.close()


class _Labeller:
    """Answers BYTES as numpy holds text: a str array (dtype <U...), not bytes objects."""

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": np.array([["neg", "pos"]] * inputs["x"].shape[0])}


async def test_a_bytes_output_held_as_numpy_text_is_taken(tmp_path: Path) -> None:
    """Text of numpy's own string dtype is the kind BYTES declares (it was refused as another
    kind by the output check)."""
    runtimes = default_runtime_registry()
    runtimes.register("labeller", lambda model_dir, config: _Labeller(), platform="python")
    outputs = [{"name": "y", "datatype": "BYTES", "shape": [2]}]
    _write_model(tmp_path, "labeller", {**DOUBLER_CONFIG, "runtime": "labeller", "outputs": outputs})
    plane = DataPlane(load_repository(tmp_path, runtimes))
    request = InferRequest([Tensor("x", "FP32", np.array([[1.0, 3.0]], dtype=np.float32))])
    response = await plane.infer("labeller", None, request)
    assert response.outputs[0].datatype == "BYTES"
    assert response.outputs[0].data.tolist() == [["neg", "pos"]]
    await plane.repository.close()


async def test_a_model_still_answering_its_requests_holds_up_no_other_models_control(tmp_path: Path) -> None:
    """An unload waits for the model's requests (an LLM's generations, maybe minutes): the loads and
    unloads of other models went on waiting behind it for the repository's lock."""
    import asyncio

    released = asyncio.Event()

    class StillAnswering(Doubler):
        async def drain(self) -> None:  # its requests in flight end only when the test says so
            await released.wait()

    runtimes = _registry_with_doubler()
    runtimes.register("answering", lambda model_dir, config: StillAnswering(), platform="python")
    _write_model(tmp_path, "busy", {**DOUBLER_CONFIG, "runtime": "answering", "dynamic_batching": False})
    _write_model(tmp_path, "doubler", DOUBLER_CONFIG)
    repository = load_repository(tmp_path, runtimes)
    busy = asyncio.ensure_future(repository.unload("busy"))
    await asyncio.sleep(0.05)  # listed unloaded, waiting for its requests
    assert not busy.done() and not repository.get("busy").ready
    await asyncio.wait_for(repository.unload("doubler"), 5)
    assert (await asyncio.wait_for(repository.load("doubler"), 5)).ready
    released.set()
    await asyncio.wait_for(busy, 5)
    await repository.close()
