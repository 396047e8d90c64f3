"""Prometheus metrics of the classic-model data plane, registered on a registry the server passes in."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inferd.serving.errors import (
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    RequestTimedOutError,
    RuntimeFailedError,
    ServerOverloadedError,
)

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "inferd_kserve_requests",
            "v2 inference requests by model and outcome (success, failure, cancelled: left unfinished, "
            "as when the client leaves).",
            ["model", "outcome"],
            registry=registry,
        )
        self.failures = Counter(
            "inferd_kserve_request_failures",
            "Failed v2 inference requests by model and reason (runtime: the model's runtime raised; "
            "invalid_input, overloaded, timeout, unavailable, not_found, internal).",
            ["model", "reason"],
            registry=registry,
        )
        self.batch_requests = Histogram(
            "inferd_kserve_batch_requests",
            "Requests stacked into one runtime call by the dynamic batcher.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_rows = Histogram(
            "inferd_kserve_batch_rows",
            "Rows (batch dimension) of one runtime call.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "inferd_kserve_queue_seconds",
            "Time a request waited in the dynamic batcher's queue.",
            ["model"],
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self.runtime_seconds = Histogram(
            "inferd_kserve_runtime_seconds",
            "Duration of one runtime call.",
            ["model"],
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self.request_seconds = Histogram(
            "inferd_kserve_request_seconds",
            "A v2 request's time in the data plane, from its checks to its answer, by model and outcome.",
            ["model", "outcome"],
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "inferd_kserve_requests_in_flight",
            "v2 requests being answered (queued in a batcher, running, or streaming), by model.",
            ["model"],
            registry=registry,
        )


# A failed request's reason by its error's kind, first match: a fixed set of labels, never a message.
_FAILURE_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (RuntimeFailedError, "runtime"),  # before invalid_input, its base
    (InvalidInputError, "invalid_input"),
    (ServerOverloadedError, "overloaded"),
    (RequestTimedOutError, "timeout"),
    (ModelNotReadyError, "unavailable"),
    (ModelNotFoundError, "not_found"),
)


def failure_reason(error: Exception) -> str:
    """The ``reason`` label of a v2 request that failed with ``error``; ``internal`` for anything
    else (a fault of the server's own)."""
    return next((reason for kind, reason in _FAILURE_REASONS if isinstance(error, kind)), "internal")
