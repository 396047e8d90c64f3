"""`--api-key` / INFERD_API_KEY: API routes need the bearer key, health and metrics stay open;
SIGTERM shuts the server down cleanly."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from server_process import ServerProcess, run_server

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tiny_llama) -> Iterator[ServerProcess]:
    with run_server(tiny_llama, "--kv-cache-memory", "8MiB", env={"INFERD_API_KEY": KEY}) as process:
        yield process


def test_openai_routes_need_the_key(server: ServerProcess) -> None:
    anonymous = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        anonymous.completions.create(model=server.model, prompt="hi", max_tokens=2)
    assert caught.value.status_code == 401
    assert caught.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    response = httpx.get(f"{server.base_url}/v1/models")
    assert response.status_code == 401 and set(response.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    allowed = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0)
    assert allowed.completions.create(model=server.model, prompt="hi", max_tokens=2).choices


def test_tgi_routes_need_the_key(server: ServerProcess) -> None:
    for path in ("/generate", "/generate_stream", "/"):
        response = httpx.post(f"{server.base_url}{path}", json={"inputs": "hi"})
        assert response.status_code == 401
        assert set(response.json()) == {"error", "error_type"}
    assert httpx.get(f"{server.base_url}/info").status_code == 401
    assert InferenceClient(base_url=server.base_url, api_key=KEY).text_generation("hi", max_new_tokens=2)


def test_health_and_metrics_stay_open(server: ServerProcess) -> None:
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/metrics").status_code == 200


def test_sigterm_stops_the_server_cleanly(tiny_llama) -> None:
    with run_server(tiny_llama, "--kv-cache-memory", "8MiB") as process:
        process.process.send_signal(signal.SIGTERM)
        assert process.process.wait(timeout=30) == 0
        process.wait_for_log("server stopped")


def test_vllms_key_variable_is_read_where_inferds_is_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployment moved over from vLLM sets VLLM_API_KEY: it must not run without the key."""
    from inferd.cli import build_parser

    monkeypatch.delenv("INFERD_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert build_parser().parse_args(["serve"]).api_key == "from-vllm"
    monkeypatch.setenv("INFERD_API_KEY", "ours")
    assert build_parser().parse_args(["serve"]).api_key == "ours"
