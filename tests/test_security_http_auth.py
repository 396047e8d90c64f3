"""`--api-key` is checked before anything reads a request's body (audit #5): a request without the
key is refused from its headers, never inflated, dispatched (`/invocations`) or parsed; the 401
keeps each protocol's error shape; the open paths stay open; and the OpenAPI docs need the key
where one is set (audit #12)."""

from __future__ import annotations

import gzip
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferd.engine.async_llm import AsyncLLM
from inferd.server.app import create_app
from inferd.server.auth import OPEN_PATHS, is_open_path
from inferd.server.config import ServerConfig

KEY = "sesame"
AUTHORIZED = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "server.md"
OPENAI_SHAPE = {"message", "type", "param", "code"}
DOCS_ROUTES = ("/docs", "/redoc", "/openapi.json")


def _app(model: Path, repository: Path | None = None, api_key: str | None = KEY) -> Any:
    """A server's app; its engine is not started: nothing here needs an answer from the model."""
    llm = AsyncLLM.from_options(model, engine_process=False, kv_cache_memory="8MiB")
    return create_app(
        llm, ServerConfig(served_model_name="tiny", api_key=api_key), model_repository=repository
    )


@pytest.fixture(scope="module")
def keyed_app(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    repository = tmp_path_factory.mktemp("repository")
    shutil.copytree(EXAMPLES / "digits", repository / "digits")
    return _app(tiny_llama, repository)


@pytest.fixture
async def client(keyed_app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=keyed_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://inferd") as http:
        yield http


class _Receiver:
    """An ASGI receive that counts its calls: any call means something read the body."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.calls = 0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        return {"type": "http.request", "body": self.body, "more_body": False}


async def _call(app: Any, path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, int]:
    """``POST path`` straight through the ASGI app: its status, and how often it read the body."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"inferd"), (b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    receive, sent = _Receiver(body), []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], receive.calls


PLAIN = b'{"model": "tiny", "prompt": "hi", "max_tokens": 2}'
GZIPPED = gzip.compress(
    b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"x" * 100_000 + b'"}]}'
)


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/v1/completions", PLAIN, [(b"content-length", str(len(PLAIN)).encode())]),
        ("/v1/completions", PLAIN, []),  # chunked: the size limit would buffer it
        ("/v1/chat/completions", GZIPPED, [(b"content-encoding", b"gzip")]),  # inflated otherwise
        ("/invocations", PLAIN, [(b"content-length", str(len(PLAIN)).encode())]),  # parsed to dispatch
        ("/invocations", GZIPPED, [(b"content-encoding", b"gzip")]),
        ("/v2/models/digits/infer", PLAIN, []),
        ("/generate", PLAIN, []),
    ],
)
async def test_a_request_without_the_key_is_refused_before_its_body_is_read(
    keyed_app: Any, path: str, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    for refused in (
        [],
        [(b"authorization", b"Bearer wrong")],
        [(b"authorization", f"bearer {KEY}".encode())],
    ):
        assert await _call(keyed_app, path, body, [*headers, *refused]) == (401, 0)
    # With the key, the same request goes on to the route, which reads it.
    status, reads = await _call(
        keyed_app, path, body, [*headers, (b"authorization", f"Bearer {KEY}".encode())]
    )
    assert status != 401 and reads >= 1


async def test_the_401_keeps_each_protocols_error_shape(client: httpx.AsyncClient) -> None:
    message = "a valid API key is required: send 'Authorization: Bearer <key>'"
    for method, path in [
        ("POST", "/v1/completions"), ("GET", "/v1/models"), ("POST", "/v1/embeddings"), ("POST", "/tokenize"),
        ("POST", "/v2/rerank"), ("POST", "/reset_prefix_cache"), ("POST", "/invocations"),
    ]:  # fmt: skip
        answer = await client.request(method, path, json={"prompt": "hi"})
        error = answer.json()["error"]
        assert answer.status_code == 401 and set(error) == OPENAI_SHAPE, path
        assert error["code"] == "invalid_api_key" and error["message"] == message
    for path in ("/generate", "/generate_stream", "/"):
        answer = await client.post(path, json={"inputs": "hi"})
        assert answer.status_code == 401 and answer.json() == {
            "error": message,
            "error_type": "authentication",
        }
    for method, path in [("GET", "/v2"), ("GET", "/v2/models/digits"), ("POST", "/v2/repository/index")]:
        answer = await client.request(method, path)
        assert answer.status_code == 401 and answer.json() == {"error": message}


async def test_with_the_key_the_routes_answer(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/models", headers=AUTHORIZED)).json()["data"][0]["id"] == "tiny"
    assert (await client.get("/v2/models/digits/ready", headers=AUTHORIZED)).status_code == 200
    tokens = await client.post("/tokenize", json={"prompt": "hi"}, headers=AUTHORIZED)
    assert tokens.status_code == 200 and tokens.json()["count"] >= 1


async def test_the_open_paths_need_no_key(client: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/health"), ("GET", "/ping"), ("POST", "/ping"), ("GET", "/version"), ("GET", "/metrics"),
        ("GET", "/v2/health/live"), ("GET", "/v2/health/ready"),
    ]:  # fmt: skip
        answer = await client.request(method, path)
        # 503 for the probes: the engine was not started here. Never a 401.
        assert answer.status_code in (200, 503), (path, answer.status_code)
    assert (await client.get("/v2/health/live")).json() == {"live": True}


async def test_only_the_exact_open_paths_are_open(client: httpx.AsyncClient) -> None:
    for path in ("/health/", "/HEALTH", "/metrics/x", "/v2/health/livex", "/v2/health", "/nope", "/v1/nope"):
        assert (await client.get(path)).status_code == 401, path
    assert not is_open_path("/health/../v1/models") and is_open_path("/health")


async def test_under_a_root_path_the_prefixed_open_paths_stay_open(tiny_llama: Path) -> None:
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    app = create_app(llm, ServerConfig(served_model_name="tiny", api_key=KEY, root_path="/llm"))
    transport = httpx.ASGITransport(app=app, root_path="/llm")  # as uvicorn passes --root-path
    async with httpx.AsyncClient(transport=transport, base_url="http://inferd") as http:
        assert (await http.get("/llm/version")).status_code == 200
        assert (await http.get("/llm/v1/models")).status_code == 401
        assert (await http.get("/llm/v1/models", headers=AUTHORIZED)).status_code == 200


async def test_the_openapi_docs_need_the_key_where_one_is_set(
    client: httpx.AsyncClient, tiny_llama: Path
) -> None:
    for path in DOCS_ROUTES:
        assert (await client.get(path)).status_code == 401, path
        assert (await client.get(path, headers=AUTHORIZED)).status_code == 200, path
    transport = httpx.ASGITransport(app=_app(tiny_llama, api_key=None))
    async with httpx.AsyncClient(transport=transport, base_url="http://inferd") as open_client:
        for path in DOCS_ROUTES:
            assert (await open_client.get(path)).status_code == 200, path


def test_the_documented_open_paths_are_the_ones_served_open() -> None:
    """docs/server.md's Endpoints table and ``OPEN_PATHS`` name the same paths."""
    rows = [line.split("|") for line in DOCS.read_text().splitlines() if line.startswith("| `")]
    documented = set()
    for row in rows:
        route, auth = row[1], row[-2].strip()
        if auth == "open":
            documented |= set(re.findall(r"\s(/[\w/]*)`", route))  # `GET /health`, `GET`/`POST /ping`
    assert documented == OPEN_PATHS


async def test_the_docs_can_be_turned_off(tiny_llama: Path) -> None:
    """vLLM's --disable-fastapi-docs: no /docs, /redoc or /openapi.json at all."""
    from inferd.cli import build_parser

    assert build_parser().parse_args(["serve", "--disable-fastapi-docs"]).disable_fastapi_docs
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    app = create_app(llm, ServerConfig(served_model_name="tiny", disable_fastapi_docs=True))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://inferd") as http:
        for path in DOCS_ROUTES:
            assert (await http.get(path)).status_code == 404, path
        assert (await http.get("/v1/models")).status_code == 200
