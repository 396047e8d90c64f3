"""The HTTP application: every protocol's router over one Frontend, plus `/health` and `/metrics`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from inferd.engine.async_llm import AsyncLLM
from inferd.engine.generation_config import read_sampling_defaults
from inferd.server import openai, tgi
from inferd.server.auth import RequireApiKey
from inferd.server.body_timeout import BodyReadTimeout
from inferd.server.client_limits import ClientLimits
from inferd.server.config import ServerConfig
from inferd.server.decompression import RequestDecompression
from inferd.server.errors import ApiError, is_openai_path, unmatched_route_response
from inferd.server.frontend import Frontend, adapter_name_problem
from inferd.server.guarded_protocol import guarded_http_protocol
from inferd.server.http_metrics import HttpMetricFamilies, HttpMetrics
from inferd.server.invocations import SageMakerInvocations
from inferd.server.limits import BodySizeLimit
from inferd.server.metrics import ServerMetrics
from inferd.server.openai.common import error_response as openai_error_response
from inferd.server.openai_embeddings import build_embeddings_router
from inferd.server.reasoning import REASONING_FORMATS
from inferd.server.request_id import EchoRequestId
from inferd.server.stats_log import log_engine_stats
from inferd.server.tgi.generation import error_response as tgi_error_response
from inferd.version import package_version

logger = logging.getLogger("inferd.server")


def served_model_name(llm: AsyncLLM, config: ServerConfig) -> str:
    return config.served_model_name or llm.config.model_path.name


def protocol_routers(frontend: Frontend, config: ServerConfig) -> list[APIRouter]:
    """The one list of protocol routers (the API key, when set, is checked before them by the
    `RequireApiKey` middleware)."""
    return [
        openai.build_router(frontend),
        tgi.build_router(frontend, max_best_of=config.max_best_of),
    ]


def add_request_middleware(
    app: FastAPI,
    registry: CollectorRegistry,
    max_body_bytes: int,
    api_key: str | None,
    client_limits: ClientLimits,
) -> None:
    """The middleware every HTTP server here runs (`inferd serve`, the standalone v2 server), around
    what the app adds before it: the body's inflating, size limit and read timeout, the API key
    where one is set, the HTTP metrics and the client's request id, innermost first. Also keeps
    what `http_protocol` needs to give uvicorn the header limits."""
    families = HttpMetricFamilies(registry)
    app.add_middleware(RequestDecompression, max_bytes=max_body_bytes, render=render_error_for_path)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes, render=render_error_for_path)
    # Outside the size limit, whose reads of a chunked body it times too.
    app.add_middleware(
        BodyReadTimeout,
        timeout_s=client_limits.body_deadline_s,
        render=render_error_for_path,
        count_refusal=lambda reason: families.client_refusals.labels(reason=reason).inc(),
    )
    if api_key:
        # Outside everything that reads the body (the size limit, the decompression, /invocations'
        # dispatch, the routes' JSON parsing), so a request without the key costs its headers only.
        app.add_middleware(RequireApiKey, api_key=api_key, render=render_error_for_path)
    # Outside the size limit and the key check, so their 413s and 401s are counted too.
    app.add_middleware(HttpMetrics, families=families)
    app.add_middleware(EchoRequestId)  # every answer, refusals included, carries the client's id
    app.state.http_protocol = guarded_http_protocol(client_limits, families.client_refusals)


def http_protocol(app: FastAPI) -> type[asyncio.Protocol]:
    """The HTTP protocol class to give uvicorn for `app` (built by `add_request_middleware`)."""
    protocol: type[asyncio.Protocol] = app.state.http_protocol
    return protocol


def render_error_for_path(path: str, error: ApiError) -> Response:
    """An error in the shape of the protocol that serves `path` (for errors raised outside routes)."""
    if is_openai_path(path):
        return openai_error_response(error)
    if path.startswith("/v2"):
        from inferd.server.kserve.rest import api_error_response

        return api_error_response(error)
    return tgi_error_response(error)


def create_app(
    llm: AsyncLLM, config: ServerConfig | None = None, model_repository: Path | None = None
) -> FastAPI:
    """An app serving `llm`; the engine thread starts with the app and stops with it.

    `/v1/embeddings` embeds with `llm` (its last token's hidden state, normalized).
    With `model_repository`, its models are served too (KServe v2 `/v2`, `/v1/embeddings`), and so is
    `llm` over v2."""
    config = config or ServerConfig()
    registry = CollectorRegistry()
    model_name = served_model_name(llm, config)
    for name in llm.config.lora_names:
        problem = adapter_name_problem(name, (model_name, *config.model_aliases))
        if problem is not None:
            raise ValueError(f"the LoRA adapter {name!r} cannot be served: {problem}")
    if config.chat_template is not None:
        llm.tokenizer.use_chat_template(config.chat_template, "given with --chat-template")
    metrics = ServerMetrics(registry, model_name, llm.stats, prefix=config.metrics_prefix)
    metrics.describe_engine(llm.config)
    defaults = read_sampling_defaults(llm.config.model_path) if config.generation_config == "auto" else {}
    if defaults:
        logger.info("sampling defaults from the model's generation_config.json (a request's own values win): "
                    "%s", ", ".join(f"{name} {value}" for name, value in defaults.items()))  # fmt: skip
    reasoning = REASONING_FORMATS[config.reasoning_parser] if config.reasoning_parser else None
    frontend = Frontend(
        llm,
        model_name,
        metrics,
        config.request_timeout_s,
        defaults,
        reasoning,
        config.tool_call_parser,
        config.model_aliases,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        llm.start()
        interval = config.log_stats_interval_s
        stats_logger = asyncio.create_task(log_engine_stats(llm.stats, interval)) if interval > 0 else None
        try:
            yield
        finally:
            if stats_logger is not None:
                stats_logger.cancel()
            if app.state.model_repository is not None:
                await app.state.model_repository.close()
            llm.shutdown()
            frontend.close()

    if config.disable_fastapi_docs:
        app = FastAPI(title="inferd", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    else:
        app = FastAPI(title="inferd", lifespan=lifespan)
    app.add_exception_handler(HTTPException, unmatched_route_response)
    # Inside the size limit, which bounds the body it reads.
    app.add_middleware(SageMakerInvocations)
    add_request_middleware(app, registry, config.max_body_bytes, config.api_key, config.client_limits)
    if config.allowed_origins:
        # Outermost, so a refused request's answer (401, 413, ...) carries the headers a browser needs.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.state.frontend = frontend
    app.state.metrics_registry = registry
    for router in protocol_routers(frontend, config):
        app.include_router(router)
    app.state.model_repository = None
    if model_repository is not None:
        from inferd.server.kserve.launch import mount_model_repository

        # With the repository's embedding models, the LLM's embeddings on the same route.
        app.state.model_repository = mount_model_repository(
            app,
            model_repository,
            registry,
            served_llm=frontend,
            allow_client_shm=config.allow_client_shm,
            max_body_bytes=config.max_body_bytes,
            control=config.model_control,
        )
    else:
        app.include_router(build_embeddings_router(None, served_llm=frontend))

    @app.get("/health", response_class=Response)
    async def health() -> Response:
        # A dead engine's reason first: the server also drains once it died, and the reason is
        # what an operator needs to see.
        if llm.dead_reason is not None:
            return JSONResponse({"error": llm.dead_reason}, status_code=503)
        if frontend.draining:
            return JSONResponse({"error": "the server is shutting down"}, status_code=503)
        if llm.is_alive:
            return Response(status_code=200)
        return JSONResponse({"error": "engine is not running"}, status_code=503)

    # SageMaker's health check (vLLM serves it too): the same answer.
    app.add_api_route("/ping", health, methods=["GET", "POST"], response_class=Response)

    @app.get("/version")
    async def server_version() -> Response:
        return JSONResponse({"version": package_version()})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
