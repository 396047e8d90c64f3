"""`inferd serve [MODEL_PATH]`: load the model, serve the OpenAI and TGI APIs with uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from inferd.server.config import ServerConfig

if TYPE_CHECKING:
    import uvicorn

logger = logging.getLogger("inferd.server")

# Flags passed as they are to `AsyncLLM.from_options` when given.
_ENGINE_OPTIONS = (
    "kv_cache_memory",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "block_size",
    "dtype",
    "device",
    "seed",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="Serve an LLM over HTTP (OpenAI- and TGI-compatible APIs, Prometheus metrics)."
    )
    parser.add_argument("model", nargs="?", default=None, help="model folder; default: the built-in model")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000, help="0 picks a free port (logged when ready)")
    server.add_argument(
        "--served-model-name", default=None, help="name clients use; default: the folder name"
    )
    server.add_argument(
        "--api-key",
        default=os.environ.get("INFERD_API_KEY"),
        help="require 'Authorization: Bearer KEY' on the API routes; default: $INFERD_API_KEY",
    )
    server.add_argument(
        "--model-repository", type=Path, default=None, help="also serve the classic models in DIR (KServe v2)"
    )
    server.add_argument(
        "--grpc-port", type=int, default=8001, help="KServe v2 gRPC port (with --model-repository)"
    )
    engine = parser.add_argument_group("engine (unset: the engine's defaults)")
    engine.add_argument("--kv-cache-memory", default=None, help="KV cache budget, e.g. 4GiB")
    engine.add_argument("--max-model-len", type=int, default=None)
    engine.add_argument("--max-num-seqs", type=int, default=None)
    engine.add_argument("--max-num-batched-tokens", type=int, default=None)
    engine.add_argument("--block-size", type=int, default=None)
    engine.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    engine.add_argument("--device", default=None, help="cpu or cuda")
    engine.add_argument("--no-prefix-caching", action="store_true")
    engine.add_argument("--seed", type=int, default=None, help="seed of requests that bring none")
    parser.set_defaults(func=run_serve)


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {name: getattr(args, name) for name in _ENGINE_OPTIONS if getattr(args, name) is not None}
    if args.no_prefix_caching:
        options["enable_prefix_caching"] = False
    return options


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        api_key=args.api_key or None,
    )


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from inferd.engine.async_llm import AsyncLLM
    from inferd.server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = server_config(args)
    logger.info("loading model %s", args.model or "(built-in default)")
    llm = AsyncLLM.from_options(Path(args.model) if args.model else None, **engine_options(args))
    app = create_app(llm, config, args.model_repository)
    # uvicorn handles SIGINT/SIGTERM: it stops accepting, finishes, and runs the app's shutdown,
    # which stops the engine thread.
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False)
    )
    asyncio.run(_serve(server, app.state.frontend.model_name, app.state.model_repository, args.grpc_port))
    return 0


def _after_graceful_shutdown(signum: int, frame: FrameType | None) -> None:
    """uvicorn re-raises the signal that stopped it once it has shut down; by then we are done."""
    logger.info("%s handled: shut down gracefully", signal.Signals(signum).name)


async def _serve(
    server: uvicorn.Server, model_name: str, repository: Any = None, grpc_port: int = 8001
) -> None:
    # uvicorn installs its own handlers while serving, then restores these and re-raises the signal.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _after_graceful_shutdown)
    grpc_server = None
    if repository is not None:
        from inferd.server.kserve.grpc_server import start_grpc_server

        grpc_server = await start_grpc_server(repository, server.config.host, grpc_port)
        logger.info("KServe v2 gRPC at %s:%d", server.config.host, grpc_port)
    announcer = asyncio.create_task(_announce_when_ready(server, model_name))
    try:
        await server.serve()
    finally:
        announcer.cancel()
        if grpc_server is not None:
            await grpc_server.stop(grace=1.0)
    logger.info("server stopped")


async def _announce_when_ready(server: uvicorn.Server, model_name: str) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    logger.info("inferd serving %s at http://%s:%d", model_name, host, port)
