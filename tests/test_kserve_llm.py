"""LLMs over KServe v2 on a live `inferd serve`: the served LLM and an `llm` folder of the repository,
through tritonclient (HTTP and gRPC `text_input` -> `text_output`) and the REST generate extension."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from kserve_support import free_port
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from server_process import ServerProcess, run_server
from tritonclient.utils import InferenceServerException

from inferd.engine.core import EngineStats
from inferd.llm import LLM
from inferd.sampling_params import SamplingParams
from inferd.server.metrics import FinishedRequest, ServerMetrics

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
SERVED = "tiny"  # the LLM given to `inferd serve`
FOLDER_LLM = "chat"  # the `llm` folder of the repository
BROKEN_LLM = "broken"  # an `llm` folder with an unknown engine parameter
PROMPT = "To be, or not to be"
MAX_TOKENS = 12
GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS}
# Long enough that the request is still running when the client leaves (checked below).
LONG_MAX_TOKENS = 480
ENGINE_OPTIONS = {"kv_cache_memory": "8MiB", "max_model_len": 512}


@dataclass(frozen=True)
class Live:
    server: ServerProcess
    grpc_url: str
    # Offline `inferd.LLM` greedy text of PROMPT, per model name.
    expected: dict[str, str]

    @property
    def http_address(self) -> str:
        return self.server.base_url.removeprefix("http://")


def _offline_text(model: Path, prompt: str, max_tokens: int) -> str:
    llm = LLM(model, **ENGINE_OPTIONS)
    return llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens))[0].text


def _llm_folder(repository: Path, weights: Path) -> None:
    folder = repository / FOLDER_LLM
    shutil.copytree(weights, folder / "hf")
    config = {"runtime": "llm", "artifact": "hf", "parameters": ENGINE_OPTIONS}
    (folder / "model.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def live(tiny_llama: Path, tiny_model_factory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:  # type: ignore[no-untyped-def]
    folder_weights = tiny_model_factory("qwen2")
    repository = tmp_path_factory.mktemp("repository")
    shutil.copytree(EXAMPLES / "digits", repository / "digits")
    _llm_folder(repository, folder_weights)
    (repository / BROKEN_LLM).mkdir()
    (repository / BROKEN_LLM / "model.json").write_text(
        json.dumps({"runtime": "llm", "parameters": {"bogus": 1}})
    )
    expected = {
        SERVED: _offline_text(tiny_llama, PROMPT, MAX_TOKENS),
        FOLDER_LLM: _offline_text(folder_weights, PROMPT, MAX_TOKENS),
    }
    long_run = _offline_text(tiny_llama, PROMPT, LONG_MAX_TOKENS)
    assert len(long_run) > 100, "the disconnect test needs a prompt that does not stop early"
    grpc_port = free_port()
    args = ["--served-model-name", SERVED, "--kv-cache-memory", "8MiB", "--max-model-len", "512"]
    args += ["--model-repository", str(repository), "--grpc-port", str(grpc_port)]
    with run_server(tiny_llama, *args) as server:
        yield Live(server, f"127.0.0.1:{grpc_port}", expected)
    # Shut down by SIGTERM: the repository's LLM engine is stopped with the server.
    assert server.process.returncode == 0, server.log_text()
    server.wait_for_log(f"LLM '{FOLDER_LLM}' stopped")


def _metric(server: ServerProcess, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there is none)."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def _wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


@pytest.mark.parametrize("model", [SERVED, FOLDER_LLM])
def test_both_llms_are_ready_with_text_metadata(live: Live, model: str) -> None:
    client = triton_http.InferenceServerClient(live.http_address)
    assert client.is_model_ready(model)
    metadata = client.get_model_metadata(model)
    assert metadata["platform"] == "inferd_llm"
    # Every input and output the configuration lists (perf_analyzer looks each one up here).
    config = client.get_model_config(model)
    assert [(t["name"], t["shape"]) for t in metadata["inputs"]] == [
        (t["name"], t["dims"]) for t in config["input"]
    ]
    assert [t["name"] for t in metadata["outputs"]] == [t["name"] for t in config["output"]]
    assert metadata["inputs"][0] == {"name": "text_input", "datatype": "BYTES", "shape": [1]}
    assert {"name": "stream", "datatype": "BOOL", "shape": [1]} in metadata["inputs"]
    assert metadata["outputs"][0] == {"name": "text_output", "datatype": "BYTES", "shape": [1]}
    assert {"name": "num_output_tokens", "datatype": "UINT32", "shape": [1]} in metadata["outputs"]
    assert [t["name"] for t in config["input"] if t.get("optional")] == [
        t["name"] for t in config["input"][1:]
    ]
    grpc_metadata = triton_grpc.InferenceServerClient(live.grpc_url).get_model_metadata(model)
    assert [t.name for t in grpc_metadata.inputs] == [t["name"] for t in metadata["inputs"]]


def test_an_llm_folder_with_an_unknown_parameter_is_listed_not_ready(live: Live) -> None:
    index = httpx.post(f"{live.server.base_url}/v2/repository/index", timeout=10).json()
    broken = next(model for model in index if model["name"] == BROKEN_LLM)
    assert broken["state"] == "UNAVAILABLE" and "bogus" in broken["reason"]
    assert httpx.get(f"{live.server.base_url}/v2/models/{BROKEN_LLM}/ready", timeout=10).status_code == 503


def _text_input(module, binary_data: bool | None = None):  # type: ignore[no-untyped-def]
    tensor = module.InferInput("text_input", [1], "BYTES")
    data = np.array([PROMPT.encode()], dtype=object)
    if binary_data is None:
        tensor.set_data_from_numpy(data)
    else:
        tensor.set_data_from_numpy(data, binary_data=binary_data)
    return tensor


@pytest.mark.parametrize("model", [SERVED, FOLDER_LLM])
@pytest.mark.parametrize("binary_data", [True, False])
def test_tritonclient_http_text_input_equals_offline_greedy(
    live: Live, model: str, binary_data: bool
) -> None:
    client = triton_http.InferenceServerClient(live.http_address)
    result = client.infer(model, [_text_input(triton_http, binary_data)], parameters=GREEDY)
    assert result.as_numpy("text_output")[0].decode() == live.expected[model]


@pytest.mark.parametrize("model", [SERVED, FOLDER_LLM])
def test_tritonclient_grpc_text_input_equals_offline_greedy(live: Live, model: str) -> None:
    client = triton_grpc.InferenceServerClient(live.grpc_url)
    result = client.infer(model, [_text_input(triton_grpc)], parameters=GREEDY)
    assert result.as_numpy("text_output")[0].decode() == live.expected[model]


def _sse_payloads(response: httpx.Response) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line[len("data: ") :]) for line in response.iter_lines() if line.startswith("data: ")]


@pytest.mark.parametrize("model", [SERVED, FOLDER_LLM])
def test_rest_generate_and_its_stream_agree_with_offline(live: Live, model: str) -> None:
    url = f"{live.server.base_url}/v2/models/{model}"
    body = {"text_input": PROMPT, "parameters": GREEDY}
    answer = httpx.post(f"{url}/generate", json=body, timeout=30).json()
    assert answer["text_output"] == live.expected[model]
    assert answer["model_name"] == model and answer["finish_reason"] in ("length", "stop")
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=30) as response:
        assert response.status_code == 200
        events = _sse_payloads(response)
    assert "".join(event["text_output"] for event in events) == answer["text_output"]
    assert events[-1]["finish_reason"] == answer["finish_reason"]
    assert all("finish_reason" not in event for event in events[:-1])


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -5}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ""}, "stop"),
        ({"max_tokens": 600}, "max_tokens"),  # more than the 512-token context holds
        ({"guided_regex": "a(b"}, "guided_regex"),
        ({"guided_choice": "[1]"}, "guided_choice"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "a", "guided_grammar": 'start: "a"'}, "one structured output"),
        # Fields the server does not know are refused by name, as Triton's vLLM backend fails them.
        ({"max_token": 3}, "'max_token'"),
        ({"logprobs": 2}, "'logprobs' is not supported"),
        ({"guided_decoding": json.dumps({"backend": "outlines", "regex": "a"})}, "'backend'"),
        ({"bad_words": json.dumps([" "])}, "bad_words"),
        ({"logit_bias": json.dumps({"99999999": 5})}, "logit_bias"),
    ],
)
def test_bad_parameters_are_invalid_input_on_every_path(live: Live, parameters: dict, named: str) -> None:  # type: ignore[type-arg]
    url = f"{live.server.base_url}/v2/models/{SERVED}"
    for route in ("generate", "generate_stream"):
        response = httpx.post(
            f"{url}/{route}", json={"text_input": PROMPT, "parameters": parameters}, timeout=30
        )
        assert response.status_code == 400, response.text
        assert named in response.json()["error"]
    with pytest.raises(InferenceServerException) as http_error:
        triton_http.InferenceServerClient(live.http_address).infer(
            SERVED, [_text_input(triton_http)], parameters=parameters
        )
    assert http_error.value.status() == "400"
    with pytest.raises(InferenceServerException) as grpc_error:
        triton_grpc.InferenceServerClient(live.grpc_url).infer(
            SERVED, [_text_input(triton_grpc)], parameters=parameters
        )
    assert grpc_error.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize("model", [SERVED, FOLDER_LLM])
def test_guided_parameters_constrain_the_text_on_every_path(live: Live, model: str) -> None:
    """vLLM's guided_* parameters; over gRPC, where parameters are scalars, schemas and choices
    travel as JSON text."""
    url = f"{live.server.base_url}/v2/models/{model}/generate"
    # A null field is unset, as in vLLM: not a second constraint.
    body = {
        "text_input": PROMPT,
        "parameters": {"max_tokens": 20, "guided_regex": "[0-9]{3}", "guided_json": None},
    }
    assert re.fullmatch("[0-9]{3}", httpx.post(url, json=body, timeout=30).json()["text_output"])
    rest = {"max_tokens": 20, "guided_choice": ["north", "south"]}
    assert httpx.post(url, json={"text_input": PROMPT, **rest}, timeout=30).json()["text_output"] in (
        "north",
        "south",
    )
    schema = {"type": "object", "properties": {"up": {"type": "boolean"}}, "required": ["up"]}
    grpc_client = triton_grpc.InferenceServerClient(live.grpc_url)
    result = grpc_client.infer(
        model, [_text_input(triton_grpc)], parameters={"max_tokens": 20, "guided_json": json.dumps(schema)}
    )
    text = result.as_numpy("text_output")[0].decode()
    assert isinstance(json.loads(text)["up"], bool)


def test_empty_and_too_long_prompts_are_invalid_input(live: Live) -> None:
    url = f"{live.server.base_url}/v2/models/{FOLDER_LLM}/generate"
    empty = httpx.post(url, json={"text_input": "", "max_tokens": 4}, timeout=30)
    assert empty.status_code == 400 and "empty" in empty.json()["error"]
    too_long = httpx.post(url, json={"text_input": "To be " * 400, "max_tokens": 4}, timeout=30)
    assert too_long.status_code == 400, too_long.text


def test_metrics_count_v2_requests_of_both_llms(live: Live) -> None:
    finished = "inferd:requests_finished_total"
    before = {model: _metric(live.server, finished, model_name=model) for model in (SERVED, FOLDER_LLM)}
    body = {"text_input": PROMPT, "parameters": GREEDY}
    for model in (SERVED, FOLDER_LLM):
        url = f"{live.server.base_url}/v2/models/{model}/generate"
        assert httpx.post(url, json=body, timeout=30).is_success
    grpc_client = triton_grpc.InferenceServerClient(live.grpc_url)
    grpc_client.infer(SERVED, [_text_input(triton_grpc)], parameters=GREEDY)
    assert _metric(live.server, finished, model_name=SERVED) - before[SERVED] == 2
    assert _metric(live.server, finished, model_name=FOLDER_LLM) - before[FOLDER_LLM] == 1
    assert _metric(live.server, "inferd_kserve_requests_total", model=SERVED, outcome="success") >= 1


def _v2_requests(live: Live, outcome: str) -> float:
    return _metric(live.server, "inferd_kserve_requests_total", model=SERVED, outcome=outcome)


def test_leaving_generate_stream_aborts_the_request(live: Live) -> None:
    """The engine's request is aborted, and the v2 request is counted as cancelled, its in-flight
    count back down."""

    def aborted() -> float:
        return _metric(live.server, "inferd:requests_aborted_total", model_name=SERVED)

    def generated() -> float:
        return _metric(live.server, "inferd:generation_tokens_total", model_name=SERVED)

    aborted_before, generated_before = aborted(), generated()
    cancelled_before = _v2_requests(live, "cancelled")
    body = {"text_input": PROMPT, "parameters": {"temperature": 0, "max_tokens": LONG_MAX_TOKENS}}
    url = f"{live.server.base_url}/v2/models/{SERVED}/generate_stream"
    with httpx.stream("POST", url, json=body, timeout=30) as response:
        next(response.iter_lines())  # the first delta: the request is running; then hang up

    def settled() -> bool:
        running = _metric(live.server, "inferd:num_requests_running", model_name=SERVED)
        return running == 0 and aborted() - aborted_before == 1

    _wait_for(settled)
    assert generated() - generated_before < LONG_MAX_TOKENS
    _wait_for(lambda: _v2_requests(live, "cancelled") - cancelled_before == 1)
    assert _metric(live.server, "inferd_kserve_requests_in_flight", model=SERVED) == 0


@pytest.mark.parametrize("route", ["generate", "infer"])
def test_leaving_a_whole_answer_aborts_the_request(live: Live, route: str) -> None:
    """A client that gives up on a non-streamed generation stops it, as on the other protocols,
    and the v2 request is counted as cancelled."""

    def aborted() -> float:
        return _metric(live.server, "inferd:requests_aborted_total", model_name=SERVED)

    def generated() -> float:
        return _metric(live.server, "inferd:generation_tokens_total", model_name=SERVED)

    aborted_before, generated_before = aborted(), generated()
    cancelled_before = _v2_requests(live, "cancelled")
    parameters = {"temperature": 0, "max_tokens": LONG_MAX_TOKENS}
    if route == "generate":
        body: dict[str, object] = {"text_input": PROMPT, "parameters": parameters}
    else:
        text = {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}
        body = {"inputs": [text], "parameters": parameters}
    url = f"{live.server.base_url}/v2/models/{SERVED}/{route}"
    with pytest.raises(httpx.ReadTimeout):  # the client leaves long before the 480 tokens
        httpx.post(url, json=body, timeout=httpx.Timeout(10, read=0.05))

    def settled() -> bool:
        running = _metric(live.server, "inferd:num_requests_running", model_name=SERVED)
        return running == 0 and aborted() - aborted_before == 1

    _wait_for(settled)
    assert generated() - generated_before < LONG_MAX_TOKENS
    _wait_for(lambda: _v2_requests(live, "cancelled") - cancelled_before == 1)
    assert _metric(live.server, "inferd_kserve_requests_in_flight", model=SERVED) == 0


class _StreamResponses:
    """The responses of one `ModelStreamInfer` call, per request id, as tritonclient's callback
    gets them (errors under the id the server gives back)."""

    def __init__(self) -> None:
        self.by_id: dict[str, list[Any]] = {}
        self.errors: list[str] = []
        self.done = threading.Condition()

    def __call__(self, result: Any, error: Any) -> None:
        with self.done:
            if error is not None:
                self.errors.append(str(error))
            else:
                self.by_id.setdefault(result.get_response().id, []).append(result)
            self.done.notify_all()

    def wait(self, condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
        with self.done:
            assert self.done.wait_for(condition, timeout_s), (self.by_id.keys(), self.errors)


def _final(result: Any) -> bool:
    return bool(result.get_response().parameters["triton_final_response"].bool_param)


def _text(result: Any) -> str:
    output = result.as_numpy("text_output")
    return "" if output is None else output[0].decode()


def test_grpc_stream_infer_streams_llm_deltas_and_answers_every_request(live: Live) -> None:
    def counted(outcome: str) -> float:
        return _metric(live.server, "inferd_kserve_requests_total", model=SERVED, outcome=outcome)

    successes, failures = counted("success"), counted("failure")
    responses = _StreamResponses()
    client = triton_grpc.InferenceServerClient(live.grpc_url)
    client.start_stream(callback=responses)
    try:
        streamed = {**GREEDY, "stream": True}
        prompt = [_text_input(triton_grpc)]
        client.async_stream_infer(SERVED, prompt, request_id="deltas", parameters=streamed)
        client.async_stream_infer(
            FOLDER_LLM, prompt, request_id="whole", parameters=GREEDY, enable_empty_final_response=True
        )
        client.async_stream_infer(
            SERVED,
            [_text_input(triton_grpc)],
            request_id="empty-final",
            parameters=streamed,
            enable_empty_final_response=True,
        )
        image = triton_grpc.InferInput("image", [1, 8, 8], "FP32")
        image.set_data_from_numpy(np.zeros((1, 8, 8), dtype=np.float32))
        client.async_stream_infer("digits", [image], request_id="tensor", enable_empty_final_response=True)
        bad = {"temperature": -1.0, "stream": True}
        client.async_stream_infer(SERVED, [_text_input(triton_grpc)], request_id="bad", parameters=bad)
        ids = ("deltas", "whole", "empty-final", "tensor")
        responses.wait(lambda: all(_final(r[-1]) for i in ids if (r := responses.by_id.get(i))) and
                       set(ids) <= responses.by_id.keys() and len(responses.errors) == 1)  # fmt: skip
    finally:
        client.stop_stream()
    deltas = responses.by_id["deltas"]
    assert len(deltas) > 2 and [_final(r) for r in deltas] == [False] * (len(deltas) - 1) + [True]
    assert "".join(_text(r) for r in deltas) == live.expected[SERVED]
    finish = deltas[-1].get_response().parameters["finish_reason"].string_param
    assert finish in ("length", "stop") and _text(deltas[-1]) == ""
    whole = responses.by_id["whole"]
    assert len(whole) == 1 and _final(whole[0]) and _text(whole[0]) == live.expected[FOLDER_LLM]
    empty_final = responses.by_id["empty-final"]
    assert "".join(_text(r) for r in empty_final) == live.expected[SERVED]
    assert empty_final[-1].get_response().outputs == [] and _final(empty_final[-1])
    tensor = responses.by_id["tensor"]
    assert len(tensor) == 1 and _final(tensor[0])
    unary = triton_grpc.InferenceServerClient(live.grpc_url).infer("digits", [image])
    np.testing.assert_array_equal(tensor[0].as_numpy("probabilities"), unary.as_numpy("probabilities"))
    assert "temperature" in responses.errors[0]
    assert (counted("success") - successes, counted("failure") - failures) == (2, 1)


def test_leaving_a_grpc_stream_aborts_its_generation(live: Live) -> None:
    def aborted() -> float:
        return _metric(live.server, "inferd:requests_aborted_total", model_name=SERVED)

    aborted_before = aborted()
    responses = _StreamResponses()
    client = triton_grpc.InferenceServerClient(live.grpc_url)
    client.start_stream(callback=responses)
    long_run = {"temperature": 0, "max_tokens": LONG_MAX_TOKENS, "stream": True}
    client.async_stream_infer(SERVED, [_text_input(triton_grpc)], request_id="long", parameters=long_run)
    responses.wait(lambda: bool(responses.by_id.get("long")))  # running; then hang up
    client.stop_stream(cancel_requests=True)

    def settled() -> bool:
        running = _metric(live.server, "inferd:num_requests_running", model_name=SERVED)
        return running == 0 and aborted() - aborted_before == 1

    _wait_for(settled)


def _running(count: int) -> Callable[[], EngineStats]:
    """An engine's stats reader that reports `count` running requests and nothing else."""
    stats = EngineStats(
        num_running=count, num_waiting=0, kv_usage=0.0, num_preemptions=0, prefix_queries=0, prefix_hits=0
    )
    return lambda: stats


def test_repository_llm_metrics_share_the_served_registry() -> None:
    registry = CollectorRegistry()
    served = ServerMetrics(registry, "a", _running(1))
    other = served.for_model("b", _running(1))
    other.record_finished(FinishedRequest("stop", 3, 2, 0.1, 0.2, 0.0))
    assert (
        registry.get_sample_value(
            "inferd:requests_finished_total", {"model_name": "b", "finish_reason": "stop"}
        )
        == 1
    )
    assert registry.get_sample_value("inferd:prompt_tokens_total", {"model_name": "a"}) == 0
    for model in ("a", "b"):
        assert registry.get_sample_value("inferd:num_requests_running", {"model_name": model}) == 1


@pytest.mark.parametrize(
    ("parameters", "limits", "cap"),
    [
        ({}, (3, 900), 40),  # the server's
        ({"max_queued_requests": 5, "max_queued_tokens": 50, "max_tokens_cap": 7}, (5, 50), 7),
        (
            {"max_queued_requests": None, "max_queued_tokens": None, "max_tokens_cap": None},
            (None, None),
            None,
        ),
    ],
)
def test_an_llm_folder_takes_the_servers_limits_unless_it_sets_its_own(
    tiny_llama: Path,
    parameters: dict[str, int | None],
    limits: tuple[int | None, int | None],
    cap: int | None,
) -> None:
    """--max-queued-requests, --max-queued-tokens and --max-tokens-cap bound the repository's LLMs
    too, as the request timeout does; a folder's parameters win, null lifting the server's."""
    from inferd.engine.admission import QueueLimits
    from inferd.engine.async_llm import AsyncLLM
    from inferd.server.frontend import Frontend
    from inferd.server.kserve.llm_runtime import register_llm_runtime
    from inferd.serving.config import parse_model_config
    from inferd.serving.runtimes.registry import RuntimeRegistry

    served_llm = AsyncLLM.from_options(
        tiny_llama, queue_limits=QueueLimits(3, 900), max_tokens_cap=40, **ENGINE_OPTIONS
    )
    served = Frontend(served_llm, "a", ServerMetrics(CollectorRegistry(), "a", _running(0)), 9.0)
    runtimes = RuntimeRegistry()
    register_llm_runtime(runtimes, served)
    raw = {"runtime": "llm", "parameters": {**ENGINE_OPTIONS, **parameters}}
    model = runtimes.load(tiny_llama, parse_model_config(raw, "b"))
    try:
        admission = model.frontend.llm.admission.limits
        assert (admission.max_requests, admission.max_tokens) == limits
        assert model.frontend.max_tokens_cap == cap and model.frontend.request_timeout_s == 9.0
    finally:
        model.close()
        served_llm.shutdown()


@pytest.mark.parametrize("key", ["max_queued_requests", "max_queued_tokens", "max_tokens_cap"])
@pytest.mark.parametrize("value", [0, "5", True, 2.5])
def test_an_llm_folders_limit_must_be_a_positive_integer(tiny_llama: Path, key: str, value: object) -> None:
    from inferd.server.kserve.llm_runtime import RepositoryLLMLoader
    from inferd.serving.config import ConfigError, parse_model_config

    loader = RepositoryLLMLoader(ServerMetrics(CollectorRegistry(), "a", _running(0)))
    raw = {"runtime": "llm", "parameters": {**ENGINE_OPTIONS, key: value}}
    with pytest.raises(ConfigError, match=f"{key} must be a positive integer or null"):
        loader(tiny_llama, parse_model_config(raw, "b"))


def test_a_reloaded_or_stopped_engine_leaves_one_series_or_none() -> None:
    registry = CollectorRegistry()

    def running_samples() -> list[float]:
        return [
            sample.value
            for family in registry.collect()
            for sample in family.samples
            if sample.name == "inferd:num_requests_running" and sample.labels["model_name"] == "b"
        ]

    served = ServerMetrics(registry, "a", _running(0))
    first = served.for_model("b", _running(1))
    second = served.for_model("b", _running(2))  # a reload: the new engine replaces the old one's series
    assert running_samples() == [2]
    first.forget_engine()  # the old engine stops after the new one is in
    assert running_samples() == [2]
    second.forget_engine()  # unloaded
    assert running_samples() == []


def test_unloading_an_llm_folder_lets_its_generation_end_and_drops_its_gauges(live: Live) -> None:
    import threading

    base = live.server.base_url
    body = {"text_input": PROMPT, "parameters": {"temperature": 0, "max_tokens": LONG_MAX_TOKENS}}
    events: list[dict] = []  # type: ignore[type-arg]
    started = threading.Event()

    def stream() -> None:
        url = f"{base}/v2/models/{FOLDER_LLM}/generate_stream"
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[len("data: ") :]))
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(30)
    unload = httpx.post(f"{base}/v2/repository/models/{FOLDER_LLM}/unload", timeout=60)
    assert unload.status_code == 200, unload.text
    reader.join(timeout=60)
    # The generation in flight ran to its end before the engine stopped.
    assert events[-1].get("finish_reason") == "length" and "error" not in events[-1]
    assert "".join(e["text_output"] for e in events).startswith(live.expected[FOLDER_LLM])

    def series(name: str) -> int:
        text = httpx.get(f"{base}/metrics", timeout=10).text
        return sum(
            1
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and sample.labels.get("model_name") == FOLDER_LLM
        )

    assert series("inferd:num_requests_running") == 0  # its stopped engine is no longer scraped
    assert httpx.post(f"{base}/v2/models/{FOLDER_LLM}/generate", json=body, timeout=30).status_code == 503
    # Loaded again: one engine's gauges, and the same greedy text.
    assert httpx.post(f"{base}/v2/repository/models/{FOLDER_LLM}/load", timeout=120).status_code == 200
    assert series("inferd:num_requests_running") == 1
    again = {"text_input": PROMPT, "parameters": GREEDY}
    generated = httpx.post(f"{base}/v2/models/{FOLDER_LLM}/generate", json=again, timeout=60).json()
    assert generated["text_output"] == live.expected[FOLDER_LLM]


@pytest.mark.parametrize("model", [SERVED, FOLDER_LLM])
def test_a_timed_out_generation_is_a_408_on_every_v2_path(live: Live, model: str) -> None:
    base = f"{live.server.base_url}/v2/models/{model}"
    # 10 ms (Triton's `timeout` parameter is in microseconds) against the hundreds of ms a 480-token
    # answer takes: it always runs out.
    long = {"temperature": 0, "max_tokens": LONG_MAX_TOKENS}
    by_parameter = httpx.post(
        f"{base}/generate", json={"text_input": PROMPT, "parameters": {**long, "timeout": 10_000}}, timeout=30
    )
    assert by_parameter.status_code == 408 and "timed out" in by_parameter.json()["error"]
    header = {"X-Request-Timeout": "0.01"}
    by_header = httpx.post(
        f"{base}/generate", json={"text_input": PROMPT, "parameters": long}, headers=header, timeout=30
    )
    assert by_header.status_code == 408
    text = {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}
    infer = httpx.post(
        f"{base}/infer", json={"inputs": [text], "parameters": long}, headers=header, timeout=30
    )
    assert infer.status_code == 408
    with httpx.stream(
        "POST", f"{base}/generate_stream", json={"text_input": PROMPT, "parameters": long}, headers=header
    ) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert "timed out" in events[-1]["error"]
    client = triton_grpc.InferenceServerClient(live.grpc_url)
    grpc_input = triton_grpc.InferInput("text_input", [1], "BYTES")
    grpc_input.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, [grpc_input], parameters=long, timeout=10_000)  # Triton's: microseconds
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"


# Triton's vLLM backend clients: the flags as BOOL tensors, the sampling fields as a JSON BYTES
# tensor whose values are text, and the extra outputs asked for by `return_*` flags.
TEXT_GREEDY = {"temperature": "0", "max_tokens": str(MAX_TOKENS)}


@dataclass(frozen=True)
class Offline:
    text: str
    prompt_tokens: int
    output_tokens: int
    cumulative_logprob: float


@pytest.fixture(scope="module")
def offline(tiny_llama: Path) -> Offline:
    """The served model's greedy answer to PROMPT, with its token counts and summed log-probability."""
    llm = LLM(tiny_llama, **ENGINE_OPTIONS)
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0))[0]
    cumulative = sum(entry.logprob for entry in out.logprobs)
    return Offline(out.text, len(out.prompt_token_ids), len(out.token_ids), cumulative)


def _bool_input(module, name: str, value: bool):  # type: ignore[no-untyped-def]
    tensor = module.InferInput(name, [1], "BOOL")
    tensor.set_data_from_numpy(np.array([value], dtype=bool))
    return tensor


def _sampling_input(module, fields: dict[str, Any]):  # type: ignore[no-untyped-def]
    tensor = module.InferInput("sampling_parameters", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([json.dumps(fields).encode()], dtype=object))
    return tensor


def _extras(module) -> list[Any]:  # type: ignore[no-untyped-def]
    names = ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens")
    return [_bool_input(module, name, True) for name in names]


def test_a_triton_vllm_backend_stream_request_streams_deltas_and_counts(live: Live, offline: Offline) -> None:
    """The sample client's form: `stream` and `sampling_parameters` tensors, with the extra outputs."""
    responses = _StreamResponses()
    client = triton_grpc.InferenceServerClient(live.grpc_url)
    client.start_stream(callback=responses)
    try:
        inputs = [_text_input(triton_grpc), _bool_input(triton_grpc, "stream", True)]
        inputs += [_sampling_input(triton_grpc, TEXT_GREEDY), *_extras(triton_grpc)]
        client.async_stream_infer(SERVED, inputs, request_id="vllm")
        responses.wait(lambda: bool((r := responses.by_id.get("vllm")) and _final(r[-1])))
    finally:
        client.stop_stream()
    deltas = responses.by_id["vllm"]
    assert len(deltas) > 2 and "".join(_text(r) for r in deltas) == offline.text == live.expected[SERVED]
    reasons = [r.as_numpy("finish_reason")[0].decode() for r in deltas]
    assert reasons[:-1] == ["None"] * (len(deltas) - 1) and reasons[-1] in ("length", "stop")
    assert sum(int(r.as_numpy("num_output_tokens")[0]) for r in deltas) == offline.output_tokens
    assert {int(r.as_numpy("num_input_tokens")[0]) for r in deltas} == {offline.prompt_tokens}


@pytest.mark.parametrize("module", [triton_http, triton_grpc])
def test_a_triton_vllm_backend_request_gets_the_prompt_and_extras_where_asked(
    live: Live, offline: Offline, module: Any
) -> None:
    client = module.InferenceServerClient(live.http_address if module is triton_http else live.grpc_url)
    inputs = [_text_input(module), _sampling_input(module, TEXT_GREEDY), *_extras(module)]
    inputs += [_bool_input(module, "exclude_input_in_output", False)]
    inputs += [_bool_input(module, "return_cumulative_logprob", True)]
    result = client.infer(SERVED, inputs)
    assert result.as_numpy("text_output")[0].decode() == PROMPT + offline.text
    assert int(result.as_numpy("num_output_tokens")[0]) == offline.output_tokens
    assert int(result.as_numpy("num_input_tokens")[0]) == offline.prompt_tokens
    assert result.as_numpy("finish_reason")[0].decode() in ("length", "stop")
    assert result.as_numpy("cumulative_logprob")[0] == pytest.approx(offline.cumulative_logprob, abs=1e-3)
    # Request parameters given as text, as those clients also send them; only the listed output.
    only = [module.InferRequestedOutput("num_output_tokens")]
    result = client.infer(SERVED, [_text_input(module)], parameters=TEXT_GREEDY, outputs=only)
    assert result.as_numpy("text_output") is None
    assert int(result.as_numpy("num_output_tokens")[0]) == offline.output_tokens


def test_vllm_sampling_fields_reach_the_engine(live: Live, tiny_llama: Path) -> None:
    fields = {"repetition_penalty": 1.5, "min_tokens": 5, "ignore_eos": True, "max_tokens": 10}
    expected = LLM(tiny_llama, **ENGINE_OPTIONS).generate(PROMPT, SamplingParams(temperature=0.0, **fields))[
        0
    ]
    as_text = {key: str(value).lower() for key, value in fields.items()} | {"temperature": "0"}
    body = {"text_input": PROMPT, "parameters": as_text, "return_num_output_tokens": True}
    answer = httpx.post(f"{live.server.base_url}/v2/models/{SERVED}/generate", json=body, timeout=30).json()
    assert answer["text_output"] == expected.text and answer["num_output_tokens"] == 10
    plain = httpx.post(
        f"{live.server.base_url}/v2/models/{SERVED}/generate",
        json={"text_input": PROMPT, "parameters": {"temperature": 0, "max_tokens": 10}},
        timeout=30,
    ).json()
    assert plain["text_output"] != expected.text  # the penalty changes the greedy answer


@pytest.mark.parametrize(
    ("extra", "named", "status"),
    [
        ({"sampling_parameters": "{not json"}, "sampling_parameters", "400"),
        ({"sampling_parameters": json.dumps({"n": "2"})}, "'n'", "400"),
        ({"sampling_parameters": json.dumps({"max_tokens": "many"})}, "max_tokens", "400"),
        ({"sampling_parameters": json.dumps({"lora_name": "nobody"})}, "nobody", "404"),
        ({"return_logprobs": True}, "return_logprobs", "400"),
        ({"stream": True, "exclude_input_in_output": False}, "exclude_input_in_output", "400"),
        ({"unknown_tensor": True}, "unknown_tensor", "400"),
    ],
)
def test_bad_triton_vllm_backend_inputs_are_refused(
    live: Live, extra: dict[str, Any], named: str, status: str
) -> None:
    inputs = [_text_input(triton_http)]
    for name, value in extra.items():
        if isinstance(value, bool):
            inputs.append(_bool_input(triton_http, name, value))
        else:
            tensor = triton_http.InferInput(name, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([value.encode()], dtype=object))
            inputs.append(tensor)
    with pytest.raises(InferenceServerException) as error:
        triton_http.InferenceServerClient(live.http_address).infer(SERVED, inputs)
    assert error.value.status() == status and named in str(error.value.message()), error.value.message()


@pytest.mark.parametrize("where", ["field", "parameters"])
def test_the_generate_extension_refuses_return_logprobs_as_infer_does(live: Live, where: str) -> None:
    body: dict[str, Any] = {"text_input": PROMPT, "max_tokens": 3}
    if where == "field":
        body["return_logprobs"] = True
    else:
        body["parameters"] = {"return_logprobs": True}
    answer = httpx.post(f"{live.server.base_url}/v2/models/{SERVED}/generate", json=body, timeout=30)
    assert answer.status_code == 400 and "'return_logprobs' is not supported" in answer.json()["error"]


def test_an_unknown_lora_name_is_refused_before_the_engine(live: Live) -> None:
    """As vLLM: a 404 naming the adapter that was never served, and no engine request (nothing
    counted as an engine error)."""
    errors = _metric(live.server, "inferd:requests_finished_total", model_name=SERVED, finish_reason="error")
    body = {"text_input": PROMPT, "max_tokens": 3, "lora_name": "nope"}
    answer = httpx.post(f"{live.server.base_url}/v2/models/{SERVED}/generate", json=body, timeout=30)
    assert answer.status_code == 404
    assert answer.json()["error"] == "lora_name: no LoRA adapter 'nope' is served (adapters: none)"
    after = _metric(live.server, "inferd:requests_finished_total", model_name=SERVED, finish_reason="error")
    assert after == errors


def test_the_vllm_backends_structured_output_objects_and_bad_words_act(live: Live) -> None:
    """`guided_decoding` (Triton's vLLM backend's name) and `structured_outputs` constrain the text,
    in the `sampling_parameters` tensor too; `bad_words` keeps a word out. Each used to be dropped."""
    url = f"{live.server.base_url}/v2/models/{SERVED}/generate"
    for key in ("guided_decoding", "structured_outputs"):
        body = {"text_input": PROMPT, "parameters": {"max_tokens": 8, key: {"choice": ["yes", "no"]}}}
        assert httpx.post(url, json=body, timeout=30).json()["text_output"] in ("yes", "no")
    fields = {"max_tokens": 8, "temperature": 0, "guided_decoding": {"choice": ["maybe", "never"]}}
    result = triton_grpc.InferenceServerClient(live.grpc_url).infer(
        SERVED, [_text_input(triton_grpc), _sampling_input(triton_grpc, fields)]
    )
    assert result.as_numpy("text_output")[0].decode() in ("maybe", "never")
    first_word = live.expected[SERVED].split()[0]
    banned = {"text_input": PROMPT, "parameters": {**GREEDY, "bad_words": [first_word]}}
    text = httpx.post(url, json=banned, timeout=30).json()["text_output"]
    assert text != live.expected[SERVED] and first_word not in text.split()


def test_tritons_priority_needs_the_priority_scheduling_policy(live: Live) -> None:
    """Triton's request `priority` (0: the default) is the engine's; this server schedules first
    come, first served, so another one is refused as the OpenAI routes refuse it."""
    url = f"{live.server.base_url}/v2/models/{SERVED}/generate"
    refused = httpx.post(
        url, json={"text_input": PROMPT, "parameters": {**GREEDY, "priority": 3}}, timeout=30
    )
    assert refused.status_code == 400 and "--scheduling-policy priority" in refused.json()["error"]
    grpc_client = triton_grpc.InferenceServerClient(live.grpc_url)
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.infer(SERVED, [_text_input(triton_grpc)], parameters=GREEDY, priority=3)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT" and "priority" in caught.value.message()
    with pytest.raises(InferenceServerException) as over_http:
        triton_http.InferenceServerClient(live.http_address).infer(
            SERVED, [_text_input(triton_http)], parameters=GREEDY, priority=3
        )
    assert over_http.value.status() == "400"
    default = httpx.post(
        url, json={"text_input": PROMPT, "parameters": {**GREEDY, "priority": 0}}, timeout=30
    )
    assert default.json()["text_output"] == live.expected[SERVED]
