"""The model's generation_config.json sampling values as defaults for the OpenAI fields a request
leaves out (`--generation-config auto`, as vLLM's default)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_process import run_server

from inferd import SamplingParams
from inferd.engine.generation_config import read_sampling_defaults
from inferd.server.openai.chat import output_budget
from inferd.server.openai.common import sampling_params
from inferd.server.openai.protocol import ChatCompletionRequest, CompletionRequest


def _folder_with(tiny_llama: Path, tmp_path: Path, generation_config: dict[str, Any]) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, **generation_config}))
    return folder


class _Fields:
    """Stands in for the Frontend: keeps the defaults and returns the fields it is given."""

    def __init__(self, defaults: dict[str, float | int]) -> None:
        self.sampling_defaults = defaults

    def sampling_params(self, field_names: object, **fields: Any) -> dict[str, Any]:
        return fields

    def adapter_for(self, name: str | None) -> str | None:
        return None  # the base model: no LoRA adapters here


def test_a_field_the_request_leaves_out_takes_the_models_value() -> None:
    recommended = _Fields({"temperature": 0.6, "top_p": 0.95, "top_k": 20})
    body = CompletionRequest.model_validate({"prompt": "x", "top_p": 0.5, "temperature": None})
    fields = sampling_params(recommended, body, 16, None)  # type: ignore[arg-type]
    # top_p sent: the request's; temperature null and top_k left out: the model's; min_p: the API's.
    assert (fields["temperature"], fields["top_p"], fields["top_k"], fields["min_p"]) == (0.6, 0.5, 20, 0.0)
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "top_k": 3})
    assert sampling_params(recommended, chat, None, None)["top_k"] == 3  # type: ignore[arg-type]
    assert sampling_params(_Fields({}), body, 16, None)["temperature"] == 1.0  # type: ignore[arg-type]


def test_a_chat_without_a_budget_takes_the_models_max_new_tokens() -> None:
    def budget(defaults: dict[str, float | int], **fields: Any) -> tuple[int | None, str]:
        body = ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], **fields}
        )
        return output_budget(body, defaults)

    assert budget({"max_tokens": 64}) == (64, "max_tokens")
    assert budget({"max_tokens": 64}, max_tokens=5) == (5, "max_tokens")  # the request's own value wins
    assert budget({"max_tokens": 64}, max_completion_tokens=300) == (300, "max_completion_tokens")
    assert budget({}) == (None, "max_tokens")  # the rest of the context
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    assert output_budget(body, {"max_tokens": 64}, cap=32) == (32, "max_tokens")  # a default: within the cap
    assert budget({"max_tokens": 8}, min_tokens=20) == (20, "max_tokens")  # never below min_tokens


def test_a_chat_server_gives_the_models_budget_within_the_context(tiny_llama: Path, tmp_path: Path) -> None:
    folder = _folder_with(tiny_llama, tmp_path, {"max_new_tokens": 7})
    messages = [{"role": "user", "content": "To be"}]
    with run_server(folder, "--kv-cache-memory", "8MiB", "--max-model-len", "64") as server:
        url = f"{server.base_url}/v1/chat/completions"
        body = {"model": "model", "messages": messages, "ignore_eos": True}
        assert httpx.post(url, json=body).json()["usage"]["completion_tokens"] == 7
        assert httpx.post(url, json={**body, "max_tokens": 9}).json()["usage"]["completion_tokens"] == 9
        # A budget larger than the context leaves: the context is the limit, not an error.
        (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 500}))
    with run_server(folder, "--kv-cache-memory", "8MiB", "--max-model-len", "64") as server:
        reply = httpx.post(f"{server.base_url}/v1/chat/completions", json=body).json()
        assert reply["choices"][0]["finish_reason"] == "length"
        assert reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"] == 64
        # min_tokens past what the context leaves: the prompt's 400, not a failure of the server.
        short = httpx.post(f"{server.base_url}/v1/chat/completions", json={**body, "min_tokens": 63})
        assert short.status_code == 400 and "maximum context length" in short.json()["error"]["message"]


def test_reading_the_defaults(tiny_llama: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = _folder_with(tiny_llama, tmp_path, {"do_sample": True, "temperature": 0.7, "top_k": "20",
                                                 "max_new_tokens": 64})  # fmt: skip
    with caplog.at_level("WARNING"):
        assert read_sampling_defaults(folder) == {"temperature": 0.7, "max_tokens": 64}
    assert "top_k is '20', not a number" in caplog.text
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7}))
    assert read_sampling_defaults(folder) == {}  # not sampled by its own library either
    # ... but its budget holds for greedy decoding too.
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 9}))
    assert read_sampling_defaults(folder) == {"max_tokens": 9}
    for bad in (0, 2.5, True, "9"):
        (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": bad}))
        with caplog.at_level("WARNING"):
            assert read_sampling_defaults(folder) == {}
        assert f"max_new_tokens is {bad!r}, not a positive integer" in caplog.text
    # top_k written as a float: a whole one is read as the count it is, another left out.
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 20.0}))
    assert read_sampling_defaults(folder) == {"top_k": 20} and SamplingParams(
        **read_sampling_defaults(folder)
    )
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 20.5}))
    with caplog.at_level("WARNING"):
        assert read_sampling_defaults(folder) == {}
    assert "top_k is 20.5, not a whole number" in caplog.text
    (folder / "generation_config.json").unlink()
    assert read_sampling_defaults(folder) == {}


def test_a_server_applies_them_unless_told_not_to(tiny_llama: Path, tmp_path: Path) -> None:
    """temperature 0 recommended: a request without one is greedy, every time."""
    folder = _folder_with(tiny_llama, tmp_path, {"do_sample": True, "temperature": 0.0})
    body = {"model": "model", "prompt": "To be", "max_tokens": 12, "ignore_eos": True}
    with run_server(folder, "--kv-cache-memory", "8MiB") as server:
        url = f"{server.base_url}/v1/completions"
        texts = {httpx.post(url, json=body).json()["choices"][0]["text"] for _ in range(3)}
        greedy = httpx.post(url, json={**body, "temperature": 0}).json()["choices"][0]["text"]
        assert texts == {greedy}
        server.wait_for_log("sampling defaults from the model's generation_config.json")
    with run_server(folder, "--kv-cache-memory", "8MiB", "--generation-config", "none") as server:
        url = f"{server.base_url}/v1/completions"
        sampled = {
            httpx.post(url, json={**body, "seed": seed}).json()["choices"][0]["text"] for seed in range(4)
        }
        assert sampled != {greedy}  # temperature 1, the API's default: seeds give other texts
