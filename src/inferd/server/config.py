"""Options of the HTTP server (engine options live in `inferd.config.EngineConfig`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free port; the ready log line gives the real one
    # The name clients pass as `model`; None means the model folder's name.
    served_model_name: str | None = None
    # When set, `/v1/*` and the TGI routes require `Authorization: Bearer <api_key>`.
    api_key: str | None = None
