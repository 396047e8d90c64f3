"""How `inferd serve` stops: a graceful drain on SIGTERM/SIGINT, and a non-zero exit when the engine dies.

Drain: new requests get a 503 and `/health` turns 503 (so load balancers stop sending), requests in
flight get up to the shutdown timeout to finish, the rest are aborted with an error, then uvicorn
closes the connections and the process exits 0. A second signal ends the wait: the requests
still running are aborted (503) at once.

Engine death: the engine thread has already failed every waiting request (each gets a 500) and
`/health` is 503; once those answers are out the server stops and the process exits 1, so a
supervisor restarts it instead of leaving a server that can only refuse.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

from inferd.server.frontend import Frontend
from inferd.server.kserve.llm_runtime import RepositoryLLM
from inferd.serving.repository import ModelRepository

logger = logging.getLogger("inferd.server")

_POLL_S = 0.02
# After aborting (or after the engine died), how long the error answers get to go out.
_SETTLE_S = 5.0
# What uvicorn gives open connections once told to stop (a client that never reads cannot hold it).
CONNECTION_CLOSE_TIMEOUT_S = 5


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGINT/SIGTERM asks for a drain instead of stopping at once."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.drain_requested = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_requested:
            super().handle_exit(sig, frame)  # a second signal: stop now
        else:
            self.drain_requested = True


async def serve(
    server: DrainingServer,
    frontend: Frontend,
    shutdown_timeout_s: float,
    repository: ModelRepository | None = None,
) -> int:
    """Runs the server until it stops; returns the process exit code (0, or 1 if the engine died).
    ``repository``: the model repository served beside the LLM, drained with it."""
    supervisor = asyncio.create_task(_supervise(server, frontend, shutdown_timeout_s, repository))
    try:
        await server.serve()
    finally:
        if not supervisor.done():
            # A second signal stopped the server mid-drain: the supervisor is told to stop, and
            # is waited for, since until it has, it has no result to read.
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
    if supervisor.cancelled():
        return 1 if frontend.llm.dead_reason is not None else 0
    return supervisor.result()


async def _supervise(
    server: DrainingServer, frontend: Frontend, shutdown_timeout_s: float, repository: ModelRepository | None
) -> int:
    while not server.should_exit:
        if server.drain_requested:
            # A second signal (uvicorn's should_exit) ends the wait: what runs is aborted at once.
            await drain(frontend, shutdown_timeout_s, repository, stop_now=lambda: server.should_exit)
            server.should_exit = True
            # The engine may have died while its requests drained: that is still a failure.
            return 1 if frontend.llm.dead_reason is not None else 0
        if server.started and frontend.llm.dead_reason is not None:
            logger.error("stopping: %s", frontend.llm.dead_reason)
            frontend.draining = True
            await _wait_for_no_requests([frontend], _SETTLE_S)
            server.should_exit = True
            return 1
        await asyncio.sleep(_POLL_S)
    return 0


async def drain(
    frontend: Frontend,
    timeout_s: float,
    repository: ModelRepository | None = None,
    stop_now: Callable[[], bool] = lambda: False,
) -> None:
    """Refuse new requests, let those in flight finish for up to `timeout_s` (or until `stop_now`
    says so), abort the rest: the served LLM's, and with a model repository, its LLMs' too (its
    other models refuse new requests and answer those their batches already hold). Aborted, they
    answer 503 before the connections close, not a cancellation's 500."""
    frontends = [frontend]
    if repository is not None:
        repository.begin_drain()
        frontends += [
            entry.runtime.frontend for entry in repository if isinstance(entry.runtime, RepositoryLLM)
        ]
    for each in frontends:
        each.draining = True
    logger.info("draining: %d request(s) in flight, up to %.1fs", _in_flight(frontends), timeout_s)
    if await _wait_for_no_requests(frontends, timeout_s, stop_now):
        return
    logger.warning("shutdown timeout or a second signal: aborting %d request(s)", _in_flight(frontends))
    for each in frontends:
        each.llm.abort_all("the server is shutting down")
    await _wait_for_no_requests(frontends, _SETTLE_S)


def _in_flight(frontends: list[Frontend]) -> int:
    return sum(each.num_in_flight for each in frontends)


async def _wait_for_no_requests(
    frontends: list[Frontend], timeout_s: float, stop_now: Callable[[], bool] = lambda: False
) -> bool:
    deadline = time.monotonic() + timeout_s
    while _in_flight(frontends) and time.monotonic() < deadline and not stop_now():
        await asyncio.sleep(_POLL_S)
    return _in_flight(frontends) == 0
