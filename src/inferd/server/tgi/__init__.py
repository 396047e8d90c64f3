"""Text Generation Inference (TGI) compatible API."""

from inferd.server.tgi.routes import build_router

__all__ = ["build_router"]
