"""KServe v2 server readiness follows the models it serves: a loaded LLM whose engine stops, or a
server that drains for shutdown, fails `/v2/health/ready` (503) and gRPC `ServerReady`, so a
readiness probe takes the replica out of rotation; a model that never loaded is reported alone."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from inferd.engine.async_llm import AsyncLLM
from inferd.server.app import create_app
from inferd.server.kserve.grpc_server import _servicer
from inferd.serving.dataplane import DataPlane
from inferd.serving.repository import ModelEntry, ModelRepository

BROKEN = "broken"


@pytest.fixture
def served(tiny_llama: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    app = create_app(llm, model_repository=tmp_path)
    llm.start()
    try:
        yield llm, app
    finally:
        llm.shutdown()


async def _ready(app: FastAPI) -> tuple[int, dict[str, object], bool]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        answer = await client.get("/v2/health/ready")
    grpc_answer = await _servicer(DataPlane(app.state.model_repository)).ServerReady(None, None)
    return answer.status_code, answer.json(), grpc_answer.ready


async def test_a_model_that_failed_to_load_leaves_the_server_ready(served) -> None:  # type: ignore[no-untyped-def]
    _, app = served
    repository: ModelRepository = app.state.model_repository
    repository.add(ModelEntry(BROKEN, None, "onnxruntime_onnx", failure="no model.onnx"))
    assert await _ready(app) == (200, {"ready": True}, True)
    assert not repository.get(BROKEN).ready


async def test_draining_makes_the_server_and_the_llm_unready(served) -> None:  # type: ignore[no-untyped-def]
    _, app = served
    assert await _ready(app) == (200, {"ready": True}, True)
    app.state.frontend.draining = True
    status, body, grpc_ready = await _ready(app)
    assert (status, body["ready"], grpc_ready) == (503, False, False)
    assert "shutting down" in str(body["error"])
    entry = app.state.model_repository.get(app.state.frontend.model_name)
    assert not entry.ready and "shutting down" in str(entry.unready_reason)


async def test_a_stopped_engine_makes_the_server_unready(served) -> None:  # type: ignore[no-untyped-def]
    llm, app = served
    llm.shutdown()
    status, body, grpc_ready = await _ready(app)
    assert (status, body["ready"], grpc_ready) == (503, False, False)
    assert "engine is not running" in str(body["error"])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        model = await client.get(f"/v2/models/{app.state.frontend.model_name}/ready")
        index = await client.post("/v2/repository/index", json={})
    assert model.status_code == 503
    assert [item["state"] for item in index.json()] == ["UNAVAILABLE"]
