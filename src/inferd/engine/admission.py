"""Admission control: bound the requests (and prompt tokens) queued ahead of the engine.

A request counts as queued from the moment it is admitted until its first output (a token or its
end): waiting in the scheduler or still prefilling. Past either bound a new request is refused at
once rather than left to wait behind a queue that cannot drain in time. Every check is two integer
comparisons under a lock, so refusing stays cheap however loaded the server is.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

# What an overloaded server tells clients to wait (seconds, the unit of `Retry-After`).
RETRY_AFTER_S = 1


class EngineOverloadedError(RuntimeError):
    """The queue is full; the request was not admitted. Retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# A step running longer than this means the engine hung (a deadlock, a device that stopped
# answering, a stopped engine process). Chunked prefill bounds a step's work (the scheduler's
# token budget), so a sound step is far shorter: this leaves room for a large model's prefill
# chunk on a CPU.
DEFAULT_STEP_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class QueueLimits:
    """None means unbounded."""

    max_requests: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"queue limit {name} must be at least 1, got {value}")


class AdmissionQueue:
    """Counts queued requests and their prompt tokens; `admit` refuses past the limits."""

    def __init__(self, limits: QueueLimits | None = None) -> None:
        self.limits = limits or QueueLimits()
        self._lock = threading.Lock()
        self.num_requests = 0
        self.num_tokens = 0

    def check(self, num_requests: int, num_tokens: int) -> None:
        """Raise EngineOverloadedError unless that many requests and tokens would be admitted now.

        Counts nothing: a server calls it before it starts a streamed response, so that a full
        queue is a 429 status rather than an error inside a 200 stream.
        """
        limits = self.limits
        if limits.max_requests is not None and self.num_requests + num_requests > limits.max_requests:
            raise EngineOverloadedError(
                f"the server is overloaded: {self.num_requests} requests are queued "
                f"(limit {limits.max_requests}); retry later"
            )
        # A prompt larger than the whole token bound still gets in when nothing else is queued.
        if (
            limits.max_tokens is not None
            and self.num_requests > 0
            and self.num_tokens + num_tokens > limits.max_tokens
        ):
            raise EngineOverloadedError(
                f"the server is overloaded: {self.num_tokens} prompt tokens are queued and this "
                f"request adds {num_tokens} (limit {limits.max_tokens}); retry later"
            )

    def admit(self, num_tokens: int) -> None:
        """Count a request in, or raise EngineOverloadedError leaving the counts unchanged."""
        with self._lock:
            self.check(1, num_tokens)
            self.num_requests += 1
            self.num_tokens += num_tokens

    def leave(self, num_tokens: int) -> None:
        """A request admitted with `num_tokens` produced its first output or ended."""
        with self._lock:
            self.num_requests -= 1
            self.num_tokens -= num_tokens
