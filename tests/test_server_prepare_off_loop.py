"""Requests are checked, rendered and tokenized on the frontend's preparing thread, not on the
event loop: a long text's tokenizing (seconds for the megabytes of text a long context admits)
would stall every other client's stream meanwhile."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import inferd
from inferd.engine.async_llm import AsyncLLM
from inferd.engine.tokenizer import Tokenizer
from inferd.server.app import create_app

PREPARING_THREAD = "inferd-prepare"


@pytest.fixture
def encoding_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread each encode of the test ran on."""
    threads: list[str] = []
    encoding = Tokenizer._encoding

    def recorded(self: Tokenizer, text: Any, add_special_tokens: bool) -> Any:
        threads.append(threading.current_thread().name)
        return encoding(self, text, add_special_tokens)

    monkeypatch.setattr(Tokenizer, "_encoding", recorded)
    return threads


@pytest.fixture(scope="module")
def generator(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A server of the tiny Llama, over v2 too (an empty model repository)."""
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="16MiB")
    app = create_app(llm, model_repository=tmp_path_factory.mktemp("repository"))
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def cross_encoder(tiny_model_factory: Callable[[str], Path]) -> Iterator[TestClient]:
    llm = AsyncLLM.from_options(
        tiny_model_factory("qwen3-reward"), engine_process=False, kv_cache_memory="16MiB"
    )
    with TestClient(create_app(llm)) as client:
        yield client


CHAT = [{"role": "user", "content": "To be"}]
GENERATOR_REQUESTS = {
    "completions": (
        "/v1/completions",
        {"prompt": ["To be", "or not"], "max_tokens": 1, "truncate_prompt_tokens": 2},
    ),
    "chat": ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 1}),
    "responses": ("/v1/responses", {"input": "To be", "max_output_tokens": 1}),
    "tokenize": ("/tokenize", {"messages": CHAT}),
    "tgi tokenize": ("/tokenize", {"inputs": "To be"}),
    "tgi generate": ("/generate", {"inputs": "To be", "parameters": {"max_new_tokens": 1}}),
    "embeddings": ("/v1/embeddings", {"input": ["To be", "or not"], "truncate_prompt_tokens": 2}),
    "chat embeddings": ("/v1/embeddings", {"messages": CHAT}),
    "score": ("/score", {"text_1": "To be", "text_2": ["or not", "to be"]}),
    "v2 generate": ("/v2/models/{model}/generate", {"text_input": "To be", "parameters": {"max_tokens": 1}}),
}


@pytest.mark.parametrize("name", GENERATOR_REQUESTS)
def test_each_route_tokenizes_on_the_preparing_thread(
    generator: TestClient, encoding_threads: list[str], name: str
) -> None:
    path, body = GENERATOR_REQUESTS[name]
    model = generator.get("/v1/models").json()["data"][0]["id"]
    response = generator.post(path.format(model=model), json=body)
    assert response.status_code == 200, response.text
    assert encoding_threads and all(t.startswith(PREPARING_THREAD) for t in encoding_threads), (
        encoding_threads
    )


def test_detokenize_decodes_on_the_preparing_thread(
    generator: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It decoded on the event loop: 4M tokens held every other request 3.7 s."""
    threads: list[str] = []
    decode = Tokenizer.decode

    def recorded(self: Tokenizer, *args: Any, **kwargs: Any) -> str:
        threads.append(threading.current_thread().name)
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "decode", recorded)
    response = generator.post("/detokenize", json={"tokens": [5, 6, 7]})
    assert response.status_code == 200, response.text
    assert threads and all(t.startswith(PREPARING_THREAD) for t in threads), threads


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/score", {"text_1": "To be", "text_2": ["or not", "to be"]}),
        ("/classify", {"messages": CHAT}),
    ],
)
def test_a_cross_encoder_tokenizes_on_the_preparing_thread(
    cross_encoder: TestClient, encoding_threads: list[str], path: str, body: dict[str, Any]
) -> None:
    response = cross_encoder.post(path, json=body)
    assert response.status_code == 200, response.text
    assert encoding_threads and all(t.startswith(PREPARING_THREAD) for t in encoding_threads), (
        encoding_threads
    )


def test_the_server_answers_others_while_a_prompt_is_tokenized(
    generator: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt whose tokenizing does not end until another request has been answered: on the
    event loop the other request could not be, and the tokenizing would wait out its time."""
    entered, answered = threading.Event(), threading.Event()
    waited: list[bool] = []
    encoding = Tokenizer._encoding

    def slow(self: Tokenizer, text: Any, add_special_tokens: bool) -> Any:
        if text == "a long prompt":
            entered.set()
            waited.append(answered.wait(timeout=10))
        return encoding(self, text, add_special_tokens)

    monkeypatch.setattr(Tokenizer, "_encoding", slow)
    results: list[int] = []
    body = {"prompt": "a long prompt", "max_tokens": 1}
    sender = threading.Thread(
        target=lambda: results.append(generator.post("/v1/completions", json=body).status_code)
    )
    before = _prepare_metrics(generator)
    sender.start()
    try:
        assert entered.wait(timeout=10)
        assert generator.get("/health").status_code == 200
        during = _prepare_metrics(generator)
        answered.set()
    finally:
        answered.set()
        sender.join(timeout=30)
    assert waited == [True]  # the health check was answered while the prompt was being tokenized
    assert results == [200]
    after = _prepare_metrics(generator)
    assert (before["preparing"], during["preparing"], after["preparing"]) == (0, 1, 0)
    for count in ("prepared", "validated"):
        assert during[count] == before.get(count, 0) and after[count] == before.get(count, 0) + 1


def _prepare_metrics(client: TestClient) -> dict[str, float]:
    """The preparing gauge and how many preparations the histogram counted."""
    found = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("inferd:num_requests_preparing{"):
            found["preparing"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("inferd:request_prepare_time_seconds_count{"):
            found["prepared"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("tgi_request_validation_duration_count{"):
            found["validated"] = float(line.rsplit(" ", 1)[1])
    return found


def test_the_tokenizer_lets_other_threads_run_while_it_encodes() -> None:
    """The tokenizers library's plain encode holds the GIL throughout (another thread ran twice in
    a 1.8 s encode); the preparing thread is of use only if the encode lets go of it."""
    tokenizer = Tokenizer(Path(inferd.__file__).parent / "data" / "default_model")
    text = "the quick brown fox jumps over the lazy dog. " * 40_000  # ~0.3 s of encoding here
    done = threading.Event()
    encoded: list[int] = []

    def encode() -> None:
        encoded.extend(tokenizer.encode(text))
        done.set()

    encoder = threading.Thread(target=encode)
    ticks = 0
    encoder.start()
    while not done.wait(timeout=0.001):
        ticks += 1
    encoder.join()
    assert len(encoded) > 100_000
    # Held, the GIL would let this thread run once per encode or so (the switch interval applies
    # only between Python bytecodes, and the encode is one call).
    assert ticks >= 20, ticks


def test_a_preparation_dropped_from_the_queue_leaves_the_gauge_at_zero(generator: TestClient) -> None:
    """A client that leaves while its preparation waits behind another's: the queued work is
    dropped, and the gauge, which the work itself would have lowered, comes down all the same."""
    frontend = generator.app.state.frontend  # type: ignore[attr-defined]
    running, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def hold() -> None:
        running.set()
        assert release.wait(10)
        ran.append("held")

    async def leave_while_queued() -> None:
        held = asyncio.ensure_future(frontend.off_loop(hold))
        assert await asyncio.to_thread(running.wait, 10)
        queued = asyncio.ensure_future(frontend.off_loop(ran.append, "dropped"))
        await asyncio.sleep(0.05)
        assert _prepare_metrics(generator)["preparing"] == 2
        queued.cancel()
        release.set()
        await held

    before = _prepare_metrics(generator)
    asyncio.run(leave_while_queued())
    after = _prepare_metrics(generator)
    assert ran == ["held"]
    assert after["preparing"] == 0 and after["prepared"] == before["prepared"] + 1


def test_a_responses_field_refused_by_name_is_reported_before_a_missing_previous_response(
    generator: TestClient,
) -> None:
    body = {"input": "hi", "truncation": "auto", "previous_response_id": "resp_nope"}
    answer = generator.post("/v1/responses", json=body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "truncation"
