"""Drives a workload against a client: Poisson, bursty or instant arrivals, a concurrency cap, progress."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from inferd.bench.client import RequestRecord
from inferd.bench.datasets import BenchRequest

# Sends request number `index` and returns its record; `run_start` is the perf_counter origin of the run.
SendFn = Callable[[int, BenchRequest, float], Awaitable[RequestRecord]]


@dataclass(frozen=True)
class RunResult:
    records: list[RequestRecord]
    duration_s: float


def arrival_offsets(
    num_requests: int, request_rate: float, seed: int, burstiness: float = 1.0
) -> list[float]:
    """Seconds from the run's start at which each request is sent.

    The first request at once, then gaps of mean ``1 / request_rate`` drawn from a gamma
    distribution of shape ``burstiness`` (as vLLM's bench draws them): 1 is a Poisson process
    (exponential gaps), below 1 the requests come in bursts, above 1 more evenly. With an infinite
    rate every request is sent at once.
    """
    if request_rate <= 0:
        raise ValueError(f"request rate must be positive, got {request_rate}")
    if not 0 < burstiness < math.inf:
        raise ValueError(f"burstiness must be a positive, finite number, got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    offsets, elapsed = [], 0.0
    for _ in range(num_requests):
        offsets.append(elapsed)
        if burstiness == 1.0:  # the same draws as before burstiness existed, for the same seed
            elapsed += rng.expovariate(request_rate)
        else:
            elapsed += rng.gammavariate(burstiness, 1.0 / (request_rate * burstiness))
    return offsets


async def run_requests(
    send: SendFn,
    requests: list[BenchRequest],
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
    burstiness: float = 1.0,
) -> RunResult:
    """Send every request on its arrival schedule and wait for all; returns records in request order.

    A request that arrives while `max_concurrency` are in flight waits for a slot, so its measured
    latency starts when it is actually sent.
    """
    from tqdm.auto import tqdm

    offsets = arrival_offsets(len(requests), request_rate, seed, burstiness)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    progress = tqdm(total=len(requests), desc="requests", unit="req", disable=not show_progress)
    run_start = time.perf_counter()

    async def one(index: int) -> RequestRecord:
        await asyncio.sleep(max(0.0, run_start + offsets[index] - time.perf_counter()))
        if slots is None:
            record = await send(index, requests[index], run_start)
        else:
            async with slots:
                record = await send(index, requests[index], run_start)
        progress.update(1)
        return record

    try:
        records = await asyncio.gather(*(one(index) for index in range(len(requests))))
    finally:
        progress.close()
    return RunResult(records=list(records), duration_s=time.perf_counter() - run_start)
