"""Options of the HTTP server (engine options live in `inferd.config.EngineConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from inferd.server.client_limits import ClientLimits
from inferd.server.limits import DEFAULT_MAX_BODY_BYTES
from inferd.serving.model_control import ModelControl

# The engine metrics' names start with this and a colon unless the server is told another.
DEFAULT_METRICS_PREFIX = "inferd"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free port; the ready log line gives the real one
    # The name clients pass as `model`; None means the model folder's name.
    served_model_name: str | None = None
    # More names the served model answers to (vLLM's --served-model-name with several names);
    # responses give the first.
    model_aliases: tuple[str, ...] = ()
    # When set, every path but auth.OPEN_PATHS requires `Authorization: Bearer <api_key>`.
    api_key: str | None = None
    # Default per-request timeout in seconds (a request may set its own); None: no timeout.
    request_timeout_s: float | None = None
    # Larger request bodies are refused with a 413 before any parsing.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # How large a request's headers may be, and how slowly its headers and body may arrive.
    client_limits: ClientLimits = ClientLimits()
    # On SIGTERM, requests in flight get this long to finish before they are aborted.
    shutdown_timeout_s: float = 30.0
    # "auto": the OpenAI routes take the sampling defaults of the model's generation_config.json for
    # the fields a request leaves out; "none": the API's own defaults.
    generation_config: str = "auto"
    # A name of `server/reasoning.py`'s REASONING_FORMATS: chat answers carry their thinking apart,
    # as `reasoning_content`; None: all of the text is `content`.
    reasoning_parser: str | None = None
    # "hermes": chat requests may offer tools, and answers' <tool_call> blocks become tool_calls;
    # None: a request with tools is refused.
    tool_call_parser: str | None = None
    # A Jinja chat template (its text) used instead of the model folder's; None: the folder's.
    chat_template: str | None = None
    # HTTPS: the server's private key and certificate files (PEM); both or neither.
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    # Browser origins allowed to call the API (CORS); empty: no CORS headers at all.
    allowed_origins: tuple[str, ...] = ()
    # The path prefix a reverse proxy serves the app under (ASGI root_path).
    root_path: str = ""
    # Seconds between the log lines of the engine's throughput and queues (`stats_log.py`); 0: none.
    log_stats_interval_s: float = 10.0
    # The most candidates a TGI request's `best_of` may ask for (TGI's --max-best-of; its default).
    max_best_of: int = 2
    # KServe v2 clients may register system shared memory regions (Triton's --allow-client-shm).
    allow_client_shm: bool = False
    # The repository's models loaded at start-up, and whether clients may load and unload them
    # (Triton's --model-control-mode and --load-model).
    model_control: ModelControl = ModelControl()
    # The engine metrics' names start with this and a colon (``vllm``: vLLM's names).
    metrics_prefix: str = DEFAULT_METRICS_PREFIX
    # No /docs, /redoc or /openapi.json (vLLM's --disable-fastapi-docs): the schema lists every
    # route served, and a browser cannot send the API key to the interactive docs anyway.
    disable_fastapi_docs: bool = False
