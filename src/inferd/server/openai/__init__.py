"""OpenAI-compatible API."""

from inferd.server.openai.routes import build_router

__all__ = ["build_router"]
