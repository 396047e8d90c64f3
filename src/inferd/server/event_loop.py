"""Runs a server coroutine on uvloop where it is installed (Linux, macOS), else on asyncio's loop.

The servers call ``asyncio`` themselves (to run gRPC beside uvicorn and to drain on SIGTERM), so
uvicorn's own ``loop="auto"`` never applies: the loop is chosen here instead. uvloop and
httptools (which uvicorn picks for HTTP parsing when installed) cut the event loop's CPU per
streamed token, which on a small machine is taken from the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop constructor, or None (asyncio's default) where uvloop is missing."""
    try:
        import uvloop
    except ImportError:
        logger.info("event loop: asyncio (install uvloop for a faster one)")
        return None
    logger.info("event loop: uvloop %s", uvloop.__version__)
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, _T]) -> _T:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
