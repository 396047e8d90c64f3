"""A classic-model server: KServe v2 REST + gRPC and `/v1/embeddings` over one model repository.

`inferd serve --model-repository DIR` mounts the same routers next to the LLM APIs; this launcher
serves a repository on its own (`python -m inferd.server.kserve`), e.g. for benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import prometheus_client
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException

from inferd.entrypoints.engine_args import positive_int
from inferd.server import event_loop
from inferd.server.app import add_request_middleware, http_protocol
from inferd.server.auth import api_key_from_environment
from inferd.server.client_limits import ClientLimits, add_client_limit_args, client_limits_from_args
from inferd.server.errors import unmatched_route_response
from inferd.server.kserve.grpc_server import start_grpc_server
from inferd.server.kserve.rest import build_router
from inferd.server.limits import DEFAULT_MAX_BODY_BYTES
from inferd.server.openai_embeddings import build_embeddings_router
from inferd.serving.metrics import ServingMetrics
from inferd.serving.model_control import ModelControl, add_model_control_args, model_control
from inferd.serving.repository import ModelRepository, load_repository
from inferd.serving.runtimes.registry import RuntimeRegistry, default_runtime_registry
from inferd.serving.shared_memory import SharedMemoryRegions

if TYPE_CHECKING:
    from inferd.server.frontend import Frontend

logger = logging.getLogger("inferd.server.kserve")
_DRAIN_POLL_S = 0.02


def open_repository(
    path: Path,
    metrics_registry: CollectorRegistry,
    runtimes: RuntimeRegistry | None = None,
    allow_client_shm: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    control: ModelControl | None = None,
) -> ModelRepository:
    """``allow_client_shm``: clients may register system shared memory regions (Triton's flag); a
    BYTES input may take at most ``max_body_bytes`` from one, as much as a request body.
    ``control``: the models loaded at start-up, and whether clients may load and unload them."""
    repository = load_repository(
        path, runtimes or default_runtime_registry(), ServingMetrics(metrics_registry), control
    )
    if allow_client_shm:
        repository.shared_memory = SharedMemoryRegions(max_bytes_input=max_body_bytes)
    return repository


def build_app(
    repository: ModelRepository,
    metrics_registry: CollectorRegistry,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    api_key: str | None = None,
    client_limits: ClientLimits | None = None,
) -> FastAPI:
    """With `api_key`, every path but the open ones (`inferd.server.auth.OPEN_PATHS`: here the
    `/v2/health` probes and `/metrics`) needs `Authorization: Bearer KEY`, checked as `inferd serve`
    checks it: before anything reads the body."""
    app = FastAPI(title="inferd classic models")
    add_request_middleware(app, metrics_registry, max_body_bytes, api_key, client_limits or ClientLimits())
    app.add_exception_handler(HTTPException, unmatched_route_response)
    app.include_router(build_router(repository))
    app.include_router(build_embeddings_router(repository))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def serve(
    repository: ModelRepository,
    app: FastAPI,
    host: str,
    port: int,
    grpc_port: int,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """HTTP and gRPC on one event loop until SIGINT/SIGTERM. The first signal drains, as Triton
    stops: every model refuses new requests (503, gRPC UNAVAILABLE) and reads as not ready, the
    requests in flight are answered (the batchers answer what they hold), then the servers stop. A
    second signal stops at once. `api_key` guards the gRPC calls as `build_app`'s routes (the
    health calls stay open); a gRPC request may be as large as an HTTP body, `max_body_bytes`."""
    import uvicorn

    from inferd.server.lifecycle import CONNECTION_CLOSE_TIMEOUT_S, DrainingServer

    grpc_server = await start_grpc_server(repository, host, grpc_port, api_key, max_body_bytes)
    config = uvicorn.Config(
        app, host=host, port=port, http=http_protocol(app), log_level="warning", access_log=False,
        timeout_graceful_shutdown=CONNECTION_CLOSE_TIMEOUT_S,
    )  # fmt: skip
    server = DrainingServer(config)
    supervisor = asyncio.create_task(_drain_on_signal(server, repository))
    try:
        await server.serve()
    finally:
        supervisor.cancel()
        await grpc_server.stop(grace=1.0)
        await repository.close()


async def _drain_on_signal(server: Any, repository: ModelRepository) -> None:
    while not server.should_exit:
        if server.drain_requested:
            repository.begin_drain()
            logger.info("draining: new requests are refused; those in flight are answered")
            server.should_exit = True  # uvicorn waits for the open requests' answers
            return
        await asyncio.sleep(_DRAIN_POLL_S)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inferd.server.kserve", description=__doc__)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument(
        "--api-key",
        default=api_key_from_environment(),  # as `inferd serve --api-key`
        help="require 'Authorization: Bearer KEY' (gRPC: that metadata) on every call but the health "
        "probes; default: $INFERD_API_KEY, else $VLLM_API_KEY. Without one, anyone who reaches the "
        "ports may infer, load and unload models",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="larger request bodies get a 413, larger gRPC requests RESOURCE_EXHAUSTED",
    )
    add_client_limit_args(parser)
    parser.add_argument(
        "--allow-client-shm",
        action="store_true",
        help="clients on this machine may register system shared memory regions (Triton's flag)",
    )
    add_model_control_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    control = model_control(args, parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prometheus_client.disable_created_metrics()  # as `inferd serve` (serve_cli.py)
    api_key = args.api_key or None  # an empty variable sets no key, as for `inferd serve`
    if api_key is None and not _is_loopback(args.host):
        logger.warning(
            "serving %s without an API key: anyone who reaches the ports may infer, load and unload "
            "models; give --api-key (or INFERD_API_KEY), or limit who reaches them (a network policy)",
            args.host,
        )
    client_limits = client_limits_from_args(args)
    metrics_registry = CollectorRegistry()
    repository = open_repository(
        args.model_repository,
        metrics_registry,
        allow_client_shm=args.allow_client_shm,
        max_body_bytes=args.max_body_bytes,
        control=control,
    )
    event_loop.run(
        serve(
            repository,
            build_app(repository, metrics_registry, args.max_body_bytes, api_key, client_limits),
            args.host,
            args.port,
            args.grpc_port,
            api_key,
            args.max_body_bytes,
        )
    )
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def mount_model_repository(
    app: FastAPI,
    path: Path,
    metrics_registry: CollectorRegistry,
    dependencies: Sequence[Callable[..., Any]] = (),
    served_llm: Frontend | None = None,
    allow_client_shm: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    control: ModelControl | None = None,
) -> ModelRepository:
    """Loads `path` and adds the `/v2` and `/v1/embeddings` routes to an existing app (`inferd serve`).

    With `served_llm`, that LLM is served over v2 too, under its served name, and `llm` model folders
    load with engines of their own. ``max_body_bytes``: the app's body limit (see `open_repository`)."""
    runtimes = default_runtime_registry()
    if served_llm is not None:
        from inferd.server.kserve.llm_runtime import register_llm_runtime, served_llm_entry

        register_llm_runtime(runtimes, served_llm)
    repository = open_repository(path, metrics_registry, runtimes, allow_client_shm, max_body_bytes, control)
    if served_llm is not None:
        repository.add(served_llm_entry(served_llm))
    app.include_router(build_router(repository, dependencies))
    app.include_router(build_embeddings_router(repository, dependencies, served_llm))
    return repository
