"""A model's inference statistics, as Triton's statistics extension reports them
(`GET /v2/models[/NAME[/versions/V]]/stats`): requests that succeeded and failed with their
durations, the time requests waited in the dynamic batcher's queue, the runtime calls and their
durations, per batch size too. Kept per loaded model (a reload starts afresh), updated on the
server's event loop alone.
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
        self.execution_count += 1
        self.compute_infer.add(ns)
        self.batches.setdefault(rows, Duration()).add(ns)

    def to_json(self, name: str, version: str) -> dict[str, Any]:
        """One entry of the extension's `model_stats`; the phases this server does not time apart
        (moving the inputs in and the outputs out) are zero."""
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
                "compute_input": zero,
                "compute_infer": self.compute_infer.to_json(),
                "compute_output": zero,
                "cache_hit": zero,
                "cache_miss": zero,
            },
            "batch_stats": [
                {
                    "batch_size": rows,
                    "compute_input": zero,
                    "compute_infer": d.to_json(),
                    "compute_output": zero,
                }
                for rows, d in sorted(self.batches.items())
            ],
        }
