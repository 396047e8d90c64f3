"""`inferd serve [MODEL_PATH]`: load the model, serve the OpenAI and TGI APIs with uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import prometheus_client

from inferd.engine.admission import DEFAULT_STEP_TIMEOUT_S
from inferd.entrypoints.engine_args import (
    add_engine_args,
    add_model_argument,
    engine_options,
    non_negative_float,
    positive_int,
)
from inferd.server.auth import api_key_from_environment
from inferd.server.client_limits import add_client_limit_args, client_limits_from_args
from inferd.server.config import DEFAULT_METRICS_PREFIX, ServerConfig
from inferd.server.limits import DEFAULT_MAX_BODY_BYTES
from inferd.server.reasoning import REASONING_FORMATS
from inferd.server.tool_calls import TOOL_CALL_PARSERS
from inferd.serving.model_control import ModelControl, add_model_control_args

if TYPE_CHECKING:
    from inferd.engine.async_llm import AsyncLLM
    from inferd.server.frontend import Frontend
    from inferd.server.lifecycle import DrainingServer

logger = logging.getLogger("inferd.server")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="Serve an LLM over HTTP (OpenAI- and TGI-compatible APIs, Prometheus metrics)."
    )
    add_model_argument(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=_port, default=8000, help="0 picks a free port (logged when ready)")
    server.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="name(s) clients use; responses give the first (default: the folder name)",
    )
    server.add_argument(
        "--api-key",
        # vLLM's variable too: a deployment moved over from vLLM must not run open without a word.
        default=api_key_from_environment(),
        help="require 'Authorization: Bearer KEY' on the API routes; default: $INFERD_API_KEY, else "
        "$VLLM_API_KEY",
    )
    server.add_argument(
        "--generation-config",
        choices=("auto", "none"),
        default="auto",
        help="auto: OpenAI requests take the model's generation_config.json sampling values for the fields "
        "they leave out; none: the API's own defaults",
    )
    server.add_argument(
        "--reasoning-parser",
        choices=sorted(REASONING_FORMATS),
        default=None,
        help="chat answers carry the model's <think>...</think> text apart, as reasoning_content",
    )
    server.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default=None,
        help="let chat requests offer tools; the answers' calls in this family's form become tool_calls: "
        "hermes (<tool_call> blocks: Qwen, Hermes), llama3_json, pythonic (Llama 3.2, 4), mistral",
    )
    server.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key (PEM)")
    server.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    server.add_argument(
        "--allowed-origins",
        nargs="+",
        default=(),
        metavar="ORIGIN",
        help="browser origins allowed to call the API (CORS), e.g. https://app.example or '*'; default: none",
    )
    server.add_argument(
        "--root-path", default="", help="the path prefix a reverse proxy serves this server under"
    )
    server.add_argument(
        "--log-stats-interval",
        type=non_negative_float,
        default=10.0,
        metavar="SECONDS",
        help="log the engine's throughput, queues and caches this often while it works (default 10)",
    )
    server.add_argument("--disable-log-stats", action="store_true", help="no periodic engine log line")
    server.add_argument(
        "--metrics-prefix",
        type=_metrics_prefix,
        default=DEFAULT_METRICS_PREFIX,
        help="the engine metrics' names start with this and a colon (default inferd; vllm gives vLLM's "
        "names, which its dashboards, autoscalers and the Gateway API's endpoint picker read)",
    )
    server.add_argument(
        "--disable-fastapi-docs",
        action="store_true",
        help="serve no /docs, /redoc or /openapi.json (vLLM's flag)",
    )
    server.add_argument(
        "--disable-log-requests", action="store_true", help="no log line per finished request"
    )
    server.add_argument(
        "--chat-template",
        type=_chat_template,
        default=None,
        help="a Jinja chat template (a file, or the template itself) used instead of the model's",
    )
    server.add_argument(
        "--model-repository", type=Path, default=None, help="also serve the classic models in DIR (KServe v2)"
    )
    server.add_argument(
        "--grpc-port", type=_port, default=8001, help="KServe v2 gRPC port (with --model-repository)"
    )
    server.add_argument(
        "--allow-client-shm",
        action="store_true",
        help="KServe v2 clients on this machine may register system shared memory regions (/dev/shm) and "
        "send inputs and take outputs there (Triton's flag; with --model-repository)",
    )
    add_model_control_args(server)
    limits = parser.add_argument_group("limits (overload, timeouts, shutdown)")
    limits.add_argument(
        "--max-queued-requests",
        type=positive_int,
        default=None,
        help="refuse new requests (429) while this many are queued; default: unbounded",
    )
    limits.add_argument(
        "--max-queued-tokens",
        type=positive_int,
        default=None,
        help="refuse new requests (429) while their prompt tokens would push the queued total past this",
    )
    limits.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=None,
        help="abort a request after this many seconds (per request: X-Request-Timeout or `timeout`)",
    )
    limits.add_argument(
        "--max-tokens-cap",
        type=positive_int,
        default=None,
        help="most output tokens one request may ask for; also what one without max_tokens gets at most",
    )
    limits.add_argument(
        "--max-best-of",
        type=positive_int,
        default=2,
        help="most candidates a TGI request's best_of may sample (the answer: the likeliest); default 2",
    )
    limits.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds in-flight requests get to finish before they are aborted (default 30)",
    )
    limits.add_argument(
        "--engine-step-timeout",
        type=_non_negative_float,
        default=DEFAULT_STEP_TIMEOUT_S,
        help="seconds an engine step (or an engine process's silence) may last before the engine counts as "
        f"hung: /health turns 503 and the server exits 1 (default {DEFAULT_STEP_TIMEOUT_S:g}; 0: never)",
    )
    limits.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"refuse larger request bodies with a 413 (default {DEFAULT_MAX_BODY_BYTES})",
    )
    add_client_limit_args(limits)
    add_engine_args(parser)
    parser.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the engine core in its own process (default: on CUDA only)",
    )
    parser.set_defaults(func=run_serve)


def serve_engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The shared engine flags plus the server's output cap, which the engine enforces."""
    options = engine_options(args)
    if args.max_tokens_cap is not None:
        options["max_tokens_cap"] = args.max_tokens_cap
    return options


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name[0] if args.served_model_name else None,
        model_aliases=tuple(args.served_model_name[1:]) if args.served_model_name else (),
        api_key=args.api_key or None,
        request_timeout_s=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
        client_limits=client_limits_from_args(args),
        shutdown_timeout_s=args.shutdown_timeout,
        generation_config=args.generation_config,
        reasoning_parser=args.reasoning_parser,
        tool_call_parser=args.tool_call_parser,
        chat_template=args.chat_template,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        allowed_origins=tuple(args.allowed_origins),
        root_path=args.root_path,
        log_stats_interval_s=0.0 if args.disable_log_stats else args.log_stats_interval,
        max_best_of=args.max_best_of,
        allow_client_shm=args.allow_client_shm,
        model_control=ModelControl.from_flags(args.model_control_mode, args.load_model),
        metrics_prefix=args.metrics_prefix,
        disable_fastapi_docs=args.disable_fastapi_docs,
    )


def _metrics_prefix(text: str) -> str:
    """A Prometheus name's first part: a letter or underscore, then letters, digits, underscores."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text):
        raise argparse.ArgumentTypeError(
            f"a metric name prefix is letters, digits and underscores, got {text!r}"
        )
    return text


def _chat_template(text: str) -> str:
    """The argument itself where it is a template (as vLLM's flag takes it), else a file's text.
    A template is looked for first: a real one is too long to be a file name at all."""
    if "{{" in text or "{%" in text:
        return text
    path = Path(text)
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # too long for a file name, or with a NUL
        is_file = False
    if not is_file:
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is neither a file nor a Jinja template")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {exc}") from None


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535], got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of at least 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def load_llm(args: argparse.Namespace) -> AsyncLLM:
    from inferd.engine.admission import QueueLimits
    from inferd.engine.async_llm import AsyncLLM

    limits = QueueLimits(args.max_queued_requests, args.max_queued_tokens)
    model = Path(args.model) if args.model else None
    return AsyncLLM.from_options(
        model,
        engine_process=args.engine_process,
        queue_limits=limits,
        step_timeout_s=args.engine_step_timeout or None,
        **serve_engine_options(args),
    )


def run_serve(args: argparse.Namespace) -> int:
    """Serves until SIGTERM/SIGINT (exit 0 after the drain) or until the engine dies (exit 1)."""
    import uvicorn

    from inferd.engine.gc_heap import freeze_start_up_heap
    from inferd.server import event_loop
    from inferd.server.app import create_app, http_protocol
    from inferd.server.lifecycle import CONNECTION_CLOSE_TIMEOUT_S, DrainingServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # No `<name>_created` series beside each counter and histogram (a gauge family each), as vLLM
    # turns them off: they double /metrics for a timestamp no dashboard reads.
    prometheus_client.disable_created_metrics()
    config = server_config(args)
    if (config.ssl_keyfile is None) != (config.ssl_certfile is None):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together")
    folders = [name for name in args.served_model_name or () if Path(name).is_dir()]
    if args.model is None and folders:  # `--served-model-name NAME MODEL` took the model as a name
        raise ValueError(
            f"--served-model-name took {folders[0]!r}, a folder, as a name: give the model folder "
            "before --served-model-name (inferd serve MODEL --served-model-name NAME)"
        )
    if args.disable_log_requests:  # the finished-request lines; their warnings still show
        logging.getLogger("inferd.server.requests").setLevel(logging.WARNING)
    logger.info("loading model %s", args.model or "(built-in default)")
    llm = load_llm(args)
    app = create_app(llm, config, args.model_repository)
    freeze_start_up_heap()
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            http=http_protocol(app),
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=CONNECTION_CLOSE_TIMEOUT_S,
            ssl_keyfile=config.ssl_keyfile,
            ssl_certfile=config.ssl_certfile,
            root_path=config.root_path,
        )
    )
    return event_loop.run(
        _serve(server, app.state.frontend, config, app.state.model_repository, args.grpc_port)
    )


def _after_graceful_shutdown(signum: int, frame: FrameType | None) -> None:
    """uvicorn re-raises the signal that stopped it once it has shut down; by then we are done."""
    logger.info("%s handled: shut down gracefully", signal.Signals(signum).name)


async def _serve(
    server: DrainingServer,
    frontend: Frontend,
    config: ServerConfig,
    repository: Any = None,
    grpc_port: int = 8001,
) -> int:
    from inferd.server.lifecycle import serve

    # uvicorn installs its own handlers while serving, then restores these and re-raises a second
    # signal (one that stopped it without a drain).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _after_graceful_shutdown)
    grpc_server = None
    if repository is not None:
        from inferd.server.kserve.grpc_server import start_grpc_server

        grpc_server = await start_grpc_server(
            repository, server.config.host, grpc_port, config.api_key, config.max_body_bytes
        )
        logger.info("KServe v2 gRPC at %s:%d", server.config.host, grpc_port)
    announcer = asyncio.create_task(_announce_when_ready(server, frontend.model_name))
    try:
        exit_code = await serve(server, frontend, config.shutdown_timeout_s, repository)
    finally:
        announcer.cancel()
        if grpc_server is not None:
            await grpc_server.stop(grace=1.0)
    logger.info("server stopped" if exit_code == 0 else "server stopped: the engine died")
    return exit_code


async def _announce_when_ready(server: DrainingServer, model_name: str) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    scheme = "https" if server.config.ssl_certfile else "http"
    logger.info("inferd serving %s at %s://%s:%d", model_name, scheme, host, port)
