"""The HTTP application: every protocol's router over one Frontend, plus `/health` and `/metrics`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.responses import JSONResponse, Response

from inferd.engine.async_llm import AsyncLLM
from inferd.server import openai, tgi
from inferd.server.auth import require_api_key
from inferd.server.config import ServerConfig
from inferd.server.frontend import Frontend
from inferd.server.metrics import ServerMetrics, cuda_memory_reader


def served_model_name(llm: AsyncLLM, config: ServerConfig) -> str:
    return config.served_model_name or llm.engine.config.model_path.name


def protocol_routers(frontend: Frontend, config: ServerConfig) -> list[APIRouter]:
    """The one list of protocol routers; each gets the API-key check when a key is set."""
    auth: list[Callable[..., Any]] = [require_api_key(config.api_key)] if config.api_key else []
    return [
        openai.build_router(frontend, auth),
        tgi.build_router(frontend, auth),
    ]


def create_app(
    llm: AsyncLLM, config: ServerConfig | None = None, model_repository: Path | None = None
) -> FastAPI:
    """An app serving `llm`; the engine thread starts with the app and stops with it.

    With `model_repository`, its models are served too (KServe v2 `/v2`, `/v1/embeddings`), and so is
    `llm` over v2."""
    config = config or ServerConfig()
    registry = CollectorRegistry()
    model_name = served_model_name(llm, config)
    metrics = ServerMetrics(registry, model_name, llm.stats, cuda_memory_reader(llm.engine.config.device))
    frontend = Frontend(llm, model_name, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        llm.start()
        try:
            yield
        finally:
            if app.state.model_repository is not None:
                await app.state.model_repository.close()
            llm.shutdown()

    app = FastAPI(title="inferd", lifespan=lifespan)
    app.state.frontend = frontend
    app.state.metrics_registry = registry
    for router in protocol_routers(frontend, config):
        app.include_router(router)
    app.state.model_repository = None
    if model_repository is not None:
        from inferd.server.kserve.launch import mount_model_repository

        auth: list[Callable[..., Any]] = [require_api_key(config.api_key)] if config.api_key else []
        app.state.model_repository = mount_model_repository(app, model_repository, registry, auth, frontend)

    @app.get("/health")
    async def health() -> Response:
        if llm.is_alive:
            return Response(status_code=200)
        return JSONResponse({"error": llm.dead_reason or "engine is not running"}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
