"""An exception nobody expected is a 500 (TGI: 424) in the protocol's shape whose message carries a
request id and nothing of the exception (audit #12): its text, which may hold server paths or a
library's panic, goes to the server's log under that id."""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferd.engine.async_llm import AsyncLLM
from inferd.server.app import create_app
from inferd.server.config import ServerConfig
from inferd.server.frontend import Frontend
from inferd.serving.dataplane import DataPlane

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
SECRET = "/srv/private/weights.bin"


def _fail(*_: Any, **__: Any) -> Any:
    raise RuntimeError(f"panic at {SECRET}")


@pytest.fixture
async def client(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    # The OpenAI and TGI routes build their sampling parameters here, before the engine is needed.
    monkeypatch.setattr(Frontend, "sampling_params", _fail)
    monkeypatch.setattr(DataPlane, "server_metadata", _fail)  # KServe v2's GET /v2
    shutil.copytree(EXAMPLES / "digits", tmp_path / "digits")
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    app = create_app(llm, ServerConfig(served_model_name="tiny"), model_repository=tmp_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://inferd") as http:
        yield http


def _message(answer: httpx.Response) -> str:
    error = answer.json()["error"]
    return error["message"] if isinstance(error, dict) else error


REQUESTS = [
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}, 500),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}, 424),
    ("GET", "/v2", None, 500),
]


@pytest.mark.parametrize(("method", "path", "body", "status"), REQUESTS)
async def test_the_answer_names_a_request_id_and_hides_the_exception(
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    status: int,
) -> None:
    with caplog.at_level(logging.ERROR, logger="inferd.server.errors"):
        answer = await client.request(method, path, json=body)
    message = _message(answer)
    assert answer.status_code == status
    assert SECRET not in answer.text and "RuntimeError" not in answer.text and "panic" not in answer.text
    request_id = answer.headers["x-request-id"]
    assert message.startswith("internal error") and message.endswith(f"request id {request_id}")
    # The log has what the client did not get, under the same id.
    logged = [record for record in caplog.records if request_id in record.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert SECRET in str(logged[0].exc_info[1])


async def test_the_clients_own_request_id_is_the_one_named(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    _, path, body, _ = REQUESTS[0]
    with caplog.at_level(logging.ERROR, logger="inferd.server.errors"):
        answer = await client.post(path, json=body, headers={"X-Request-Id": "trace-42"})
    assert answer.headers.get_list("x-request-id") == ["trace-42"]
    assert _message(answer).endswith("request id trace-42")
    assert any("trace-42" in record.getMessage() for record in caplog.records)
    # Two failures without an id of their own get different ones.
    first, second = [(await client.post(path, json=body)).headers["x-request-id"] for _ in range(2)]
    assert first != second
