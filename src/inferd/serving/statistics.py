"""A model's inference statistics, as Triton's statistics extension reports them
(`GET /v2/models[/NAME[/versions/V]]/stats`): requests that succeeded and failed with their
durations, the time requests waited in the dynamic batcher's queue and the time their runtime
call took, and the runtime calls themselves, per batch size too. Kept per loaded model (a reload
starts afresh), updated on the server's event loop alone.

As in Triton, `inference_stats` counts requests: each request that succeeded is charged the whole
duration of the runtime call that answered it (its batch's), so its counts equal the successes
and tools that divide by them (perf_analyzer) read one request's compute time. `execution_count`
and `batch_stats` count the runtime calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Duration:
    """How often something happened, and its summed duration in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class ModelStatistics:
    # Milliseconds since the epoch of the last request's end; 0 before any.
    last_inference_ms: int = 0
    # Inferences that succeeded: a batched model's rows, one for any other request.
    inference_count: int = 0
    # Runtime calls (a dynamic batch is one, whatever its requests).
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    # Requests that succeeded, each with the duration of the runtime call that answered it.
    compute_infer: Duration = field(default_factory=Duration)
    # Runtime calls by their rows.
    batches: dict[int, Duration] = field(default_factory=dict)

    def finished(self, succeeded: bool, ns: int, inferences: int) -> None:
        (self.success if succeeded else self.fail).add(ns)
        if succeeded:
            self.inference_count += inferences
        self.last_inference_ms = time.time_ns() // 1_000_000

    def queued(self, ns: int) -> None:
        self.queue.add(ns)

    def executed(self, rows: int, ns: int) -> None:
        """A runtime call of ``rows`` rows that succeeded."""
        self.execution_count += 1
        self.batches.setdefault(rows, Duration()).add(ns)

    def computed(self, ns: int) -> None:
        """A request answered by a runtime call of ``ns`` nanoseconds (its batch's, shared with the
        other requests of the batch)."""
        self.compute_infer.add(ns)

    def to_json(self, name: str, version: str) -> dict[str, Any]:
        """One entry of the extension's `model_stats`. The phases this server does not time apart
        (moving the inputs in and the outputs out) take no time, for as many requests and batches
        as the compute phase counts; the cache's are zero (there is none)."""
        zero = Duration().to_json()
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.to_json(),
                "fail": self.fail.to_json(),
                "queue": self.queue.to_json(),
                "compute_input": _untimed(self.compute_infer),
                "compute_infer": self.compute_infer.to_json(),
                "compute_output": _untimed(self.compute_infer),
                "cache_hit": zero,
                "cache_miss": zero,
            },
            "batch_stats": [
                {
                    "batch_size": rows,
                    "compute_input": _untimed(d),
                    "compute_infer": d.to_json(),
                    "compute_output": _untimed(d),
                }
                for rows, d in sorted(self.batches.items())
            ],
        }


def _untimed(counted: Duration) -> dict[str, int]:
    """A phase not timed apart from ``counted``'s (its time is in it): as many, of no duration."""
    return Duration(count=counted.count).to_json()
