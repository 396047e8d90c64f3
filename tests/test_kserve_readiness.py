"""KServe v2 server readiness follows the models it serves: a loaded LLM whose engine stops, or a
server that drains for shutdown, fails `/v2/health/ready` (503) and gRPC `ServerReady`, so a
readiness probe takes the replica out of rotation; a model that never loaded is reported alone."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as triton_grpc
from fastapi import FastAPI
from kserve_support import free_port
from server_process import run_server

from inferd.engine.async_llm import AsyncLLM
from inferd.server.app import create_app
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


async def _ready(app: FastAPI) -> tuple[int, dict[str, object]]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        answer = await client.get("/v2/health/ready")
    return answer.status_code, answer.json()


async def test_a_model_that_failed_to_load_leaves_the_server_ready(served) -> None:  # type: ignore[no-untyped-def]
    _, app = served
    repository: ModelRepository = app.state.model_repository
    repository.add(ModelEntry(BROKEN, None, "onnxruntime_onnx", failure="no model.onnx"))
    assert await _ready(app) == (200, {"ready": True})
    assert not repository.get(BROKEN).ready


async def test_draining_makes_the_server_and_the_llm_unready(served) -> None:  # type: ignore[no-untyped-def]
    _, app = served
    assert await _ready(app) == (200, {"ready": True})
    app.state.frontend.draining = True
    status, body = await _ready(app)
    assert (status, body["ready"]) == (503, False)
    assert "shutting down" in str(body["error"])
    entry = app.state.model_repository.get(app.state.frontend.model_name)
    assert not entry.ready and "shutting down" in str(entry.unready_reason)


async def test_a_stopped_engine_makes_the_server_unready(served) -> None:  # type: ignore[no-untyped-def]
    llm, app = served
    llm.shutdown()
    status, body = await _ready(app)
    assert (status, body["ready"]) == (503, False)
    assert "engine is not running" in str(body["error"])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        model = await client.get(f"/v2/models/{app.state.frontend.model_name}/ready")
        index = await client.post("/v2/repository/index", json={})
    assert model.status_code == 503
    assert [item["state"] for item in index.json()] == ["UNAVAILABLE"]


def test_a_draining_server_is_not_ready_over_rest_and_grpc(tiny_llama: Path, tmp_path: Path) -> None:
    """SIGTERM with requests still to answer: both readiness probes fail while they finish."""
    grpc_port = free_port()
    args = ["--kv-cache-memory", "8MiB", "--max-num-seqs", "1", "--shutdown-timeout", "60"]
    args += ["--model-repository", str(tmp_path), "--grpc-port", str(grpc_port)]
    with run_server(tiny_llama, *args) as server:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert client.is_server_ready()
        body = {"prompt": "To be", "max_tokens": 450, "ignore_eos": True, "temperature": 0.0}
        url = f"{server.base_url}/v1/completions"
        threads = [threading.Thread(target=lambda: httpx.post(url, json=body, timeout=60)) for _ in range(4)]
        for thread in threads:
            thread.start()
        server.wait_for_metrics(lambda m: m["inferd:num_requests_waiting"] == 3)
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while httpx.get(f"{server.base_url}/v2/health/ready", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "never unready"
            time.sleep(0.01)
        assert not client.is_server_ready()
        for thread in threads:
            thread.join(timeout=60)
        assert server.process.wait(timeout=60) == 0


async def test_the_serve_flag_lets_clients_register_shared_memory(tiny_llama: Path, tmp_path: Path) -> None:
    """`inferd serve --model-repository DIR --allow-client-shm`: the extension is listed and a region
    registers; without the flag, neither (the flag read by the command's own config builder)."""
    from inferd.cli import build_parser
    from inferd.server.serve_cli import server_config

    key = f"inferd_serve_{os.getpid()}"
    (Path("/dev/shm") / key).write_bytes(bytes(64))
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    try:
        for allowed in (True, False):
            args = build_parser().parse_args(["serve", "--allow-client-shm"] if allowed else ["serve"])
            app = create_app(llm, server_config(args), model_repository=tmp_path)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
                extensions = (await client.get("/v2")).json()["extensions"]
                body = {"key": f"/{key}", "offset": 0, "byte_size": 64}
                registered = await client.post("/v2/systemsharedmemory/region/r/register", json=body)
            await app.state.model_repository.close()  # its regions' descriptors too
            assert ("system_shared_memory" in extensions) is allowed
            assert registered.status_code == (200 if allowed else 400), registered.text
    finally:
        (Path("/dev/shm") / key).unlink()


async def test_a_drain_waits_for_the_repositorys_llms_and_refuses_every_model(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """SIGTERM's drain covers the model repository: its LLM's generation in flight is waited for
    (not cut by the server's own shutdown), and every model, LLM or not, refuses new requests."""
    import asyncio
    import json
    import shutil

    from inferd.server.config import ServerConfig
    from inferd.server.lifecycle import drain

    repository = tmp_path / "repository"
    shutil.copytree(Path(__file__).parent.parent / "examples" / "models" / "digits", repository / "digits")
    shutil.copytree(tiny_llama, repository / "chat" / "hf")
    parameters = {"kv_cache_memory": "8MiB", "max_num_seqs": 1}
    (repository / "chat" / "model.json").write_text(
        json.dumps({"runtime": "llm", "artifact": "hf", "parameters": parameters})
    )
    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB")
    app = create_app(llm, ServerConfig(), repository)
    chat = app.state.model_repository.get("chat").runtime.frontend
    long_run = {"text_input": "To be", "max_tokens": 300, "ignore_eos": True, "temperature": 0}
    image = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 8, 8], "data": [0.0] * 64}]}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as client:
            assert (await client.post("/v2/models/digits/infer", json=image)).status_code == 200
            running = asyncio.create_task(client.post("/v2/models/chat/generate", json=long_run))
            while chat.num_in_flight == 0:
                await asyncio.sleep(0.01)
            draining = asyncio.create_task(drain(app.state.frontend, 60, app.state.model_repository))
            await asyncio.sleep(0.05)
            assert not draining.done()  # waiting for the repository LLM's generation
            refused = await client.post("/v2/models/chat/generate", json={"text_input": "To be"})
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
            assert (await client.post("/v2/models/digits/infer", json=image)).status_code == 503
            assert (await client.get("/v2/models/digits/ready")).status_code == 503
            await draining
            answer = await running
    assert answer.status_code == 200 and answer.json()["finish_reason"] == "length"


async def test_the_standalone_kserve_server_drains_on_its_first_signal(tmp_path: Path) -> None:
    """`python -m inferd.server.kserve`: the first SIGTERM makes every model refuse new requests and
    read as not ready before the servers stop, as Triton's shutdown does."""
    import shutil
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from inferd.server.kserve.launch import _drain_on_signal, build_app, open_repository

    shutil.copytree(Path(__file__).parent.parent / "examples" / "models" / "digits", tmp_path / "digits")
    registry = CollectorRegistry()
    repository = open_repository(tmp_path, registry)
    app = build_app(repository, registry)
    image = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 8, 8], "data": [0.0] * 64}]}
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            assert (await client.post("/v2/models/digits/infer", json=image)).status_code == 200
            server = SimpleNamespace(should_exit=False, drain_requested=True)  # SIGTERM came
            await _drain_on_signal(server, repository)
            assert server.should_exit
            refused = await client.post("/v2/models/digits/infer", json=image)
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
            assert (await client.get("/v2/health/ready")).status_code == 503
    finally:
        await repository.close()
