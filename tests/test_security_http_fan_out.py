"""One small request cannot make an unbounded amount of work (audit #10): the engine requests one
HTTP request makes (prompts x n x best_of, one per input of embeddings, score, rerank and pooling)
are capped, beyond with a 400 naming the field; and the background responses answered at once are
capped, beyond with a 429 in OpenAI's shape."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferd.engine.async_llm import AsyncLLM
from inferd.server.app import create_app
from inferd.server.config import ServerConfig
from inferd.server.frontend import DEFAULT_MAX_ENGINE_REQUESTS
from inferd.server.openai.routes import DEFAULT_MAX_BACKGROUND_RESPONSES

CAP = DEFAULT_MAX_ENGINE_REQUESTS


@pytest.fixture
async def client(tiny_llama: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The engine is not started: a request the cap lets through ends in a 503, one it refuses in a
    400 before that (nothing is queued either way)."""
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    app = create_app(llm, ServerConfig(served_model_name="tiny"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://inferd") as http:
        yield http


def _refused_for(answer: httpx.Response, field: str) -> str:
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["param"] == field, answer.text
    return str(error["message"])


async def test_prompts_times_n_over_the_cap_is_a_400_naming_n(client: httpx.AsyncClient) -> None:
    """The audit's request: 2,000 prompts x n=16 in 19 KiB, 32,000 engine requests."""
    body = {"model": "tiny", "prompt": ["hi"] * 2000, "n": 16, "max_tokens": 1}
    message = _refused_for(await client.post("/v1/completions", json=body), "n")
    assert "32000 engine requests (2000 prompts x 16 samples)" in message and str(CAP) in message


async def test_the_field_named_is_the_one_to_lower(client: httpx.AsyncClient) -> None:
    too_many = {"model": "tiny", "prompt": [[1, 2]] * (CAP + 1), "max_tokens": 1}
    _refused_for(await client.post("/v1/completions", json=too_many), "prompt")
    candidates = {"model": "tiny", "prompt": ["hi"] * 100, "n": 2, "best_of": 30, "max_tokens": 1}
    _refused_for(await client.post("/v1/completions", json=candidates), "best_of")


async def test_up_to_the_cap_the_request_goes_on(client: httpx.AsyncClient) -> None:
    at_cap = {"model": "tiny", "prompt": ["hi"] * (CAP // 16), "n": 16, "max_tokens": 1}
    assert (await client.post("/v1/completions", json=at_cap)).status_code == 503  # the engine is off
    # One list of token ids is one prompt, however long (this one is too long for the context).
    one_prompt = {"model": "tiny", "prompt": [1] * (CAP + 1), "max_tokens": 1}
    assert "engine requests" not in _refused_for(
        await client.post("/v1/completions", json=one_prompt), "prompt"
    )


@pytest.fixture
async def running_client(tiny_llama: Path) -> AsyncIterator[httpx.AsyncClient]:
    """With the engine started: rerank embeds its query before it reads its documents."""
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    app = create_app(llm, ServerConfig(served_model_name="tiny"))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://inferd") as http,
    ):
        yield http


def _texts(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/embeddings", {"model": "tiny", "input": ["hi"] * (CAP + 1)}, "input"),
        ("/pooling", {"model": "tiny", "input": ["hi"] * (CAP + 1)}, "input"),
        (
            "/v1/score",
            {"model": "tiny", "text_1": _texts("a", CAP + 1), "text_2": _texts("b", CAP + 1)},
            "text_1",
        ),
        ("/v1/score", {"model": "tiny", "text_1": "a", "text_2": _texts("b", CAP + 1)}, "text_2"),
        ("/v1/rerank", {"model": "tiny", "query": "hi", "documents": _texts("d", CAP + 1)}, "documents"),
    ],
)
async def test_inputs_over_the_cap_are_a_400_naming_the_field(
    running_client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    field: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused before the inputs are tokenized: 300,000 of them took the one preparing thread
    6-10 s to refuse, and every other request waited behind them."""
    from inferd.server.openai import llm_embeddings

    tokenized = llm_embeddings._prompt_token_ids

    def checked_first(frontend: Any, prompts: list[Any], *rest: Any) -> Any:
        assert len(prompts) <= CAP, "the inputs were tokenized before the cap was checked"
        return tokenized(frontend, prompts, *rest)

    monkeypatch.setattr(llm_embeddings, "_prompt_token_ids", checked_first)
    _refused_for(await running_client.post(path, json=body), field)


async def test_inputs_up_to_the_cap_go_on(client: httpx.AsyncClient) -> None:
    at_cap = {"model": "tiny", "input": ["hi"] * CAP}
    assert (await client.post("/v1/embeddings", json=at_cap)).status_code == 503  # the engine is off


async def test_background_responses_answered_at_once_are_bounded(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    app = create_app(llm, ServerConfig(served_model_name="tiny"))
    release = asyncio.Event()

    def held(*_: Any, **__: Any) -> AsyncIterator[Any]:
        """Answers that stay in progress until released (the engine would end them at its pace)."""

        async def outputs() -> AsyncIterator[Any]:
            await release.wait()
            return
            yield

        return outputs()

    monkeypatch.setattr(app.state.frontend, "generate", held)
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 2, "background": True}
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://inferd")
    async with app.router.lifespan_context(app), http:
        started = [
            (await http.post("/v1/responses", json=body)).json()
            for _ in range(DEFAULT_MAX_BACKGROUND_RESPONSES)
        ]
        assert {response["status"] for response in started} == {"queued"}
        refused = await http.post("/v1/responses", json=body)
        error = refused.json()["error"]
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert error["code"] == "rate_limit_exceeded" and error["message"].startswith("background: ")
        # One that ends makes room for another.
        assert (await http.post(f"/v1/responses/{started[0]['id']}/cancel")).json()["status"] == "cancelled"
        assert (await http.post("/v1/responses", json=body)).status_code == 200
        release.set()
