"""Dynamic batching: requests arriving within `max_queue_delay` are stacked along the batch dimension
up to `max_batch_size` rows and run as one runtime call in a worker thread; results are split back.

Requests are only stacked with others whose non-batch shapes match. When a stacked call fails, each
request of it is run alone, so one bad request fails by itself and the others still get answers.

As Triton's dynamic batcher: with preferred batch sizes, the queued requests (in arrival order) that
make up the largest of them reachable run at once, without waiting out the delay; a request whose
timeout passes while it waits is answered as timed out when the next batch is formed, not run.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from inferd.serving.errors import RequestTimedOutError
from inferd.serving.metrics import ServingMetrics
from inferd.serving.statistics import ModelStatistics

RunBatch = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
_ShapeKey = tuple[tuple[str, tuple[int, ...]], ...]


@dataclass
class _Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    key: _ShapeKey
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued_at: float
    # When it stops waiting (monotonic seconds): past it, it is answered as timed out; None: never.
    deadline: float | None = None
    started_at: float = 0.0  # when its batch began to run
    # The duration of the runtime call that answered it (its batch's), charged to it in the statistics.
    compute_ns: int = 0

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


def _shape_key(inputs: dict[str, np.ndarray]) -> _ShapeKey:
    return tuple(sorted((name, tuple(array.shape[1:])) for name, array in inputs.items()))


def _split(outputs: dict[str, np.ndarray], row_counts: list[int]) -> list[dict[str, np.ndarray]]:
    total = sum(row_counts)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise ValueError(f"output {name!r} has shape {list(array.shape)}, expected {total} rows first")
    bounds = np.cumsum(row_counts)[:-1]
    per_output = {name: np.split(array, bounds) for name, array in outputs.items()}
    return [{name: parts[i] for name, parts in per_output.items()} for i in range(len(row_counts))]


class DynamicBatcher:
    def __init__(
        self,
        model_name: str,
        run_batch: RunBatch,
        max_batch_size: int,
        max_queue_delay_s: float,
        metrics: ServingMetrics | None = None,
        max_batches_in_flight: int = 2,
        stats: ModelStatistics | None = None,
        preferred_batch_sizes: tuple[int, ...] = (),
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if any(not 1 <= size <= max_batch_size for size in preferred_batch_sizes):
            raise ValueError(f"preferred batch sizes must be in 1..{max_batch_size}")
        self._model_name = model_name
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_queue_delay_s = max_queue_delay_s
        self._preferred = frozenset(preferred_batch_sizes)
        # A batch larger than every preferred size is no longer worth waiting for (Triton's rule).
        self._enough_rows = max(preferred_batch_sizes, default=max_batch_size)
        self._metrics = metrics
        self._stats = stats
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        # More than one batch may run at once: a runtime call in a worker thread waits for the GIL
        # while the event loop parses requests, and the next batch should form and start meanwhile.
        self._max_batches_in_flight = max_batches_in_flight
        self._in_flight: set[asyncio.Task[None]] = set()
        self._batch_done = asyncio.Event()

    async def submit(
        self, inputs: dict[str, np.ndarray], timeout_s: float | None = None
    ) -> dict[str, np.ndarray]:
        """Runs one request (every input with the same number of rows first) and returns its outputs.
        ``timeout_s``: how long it may wait in the queue (RequestTimedOutError past it); None: as
        long as it takes."""
        rows = next(iter(inputs.values())).shape[0]
        if rows > self._max_batch_size:
            raise ValueError(f"batch of {rows} rows exceeds max_batch_size {self._max_batch_size}")
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        deadline = None if timeout_s is None else now + timeout_s
        self._queue.append(_Pending(inputs, rows, _shape_key(inputs), future, now, deadline))
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())
        return await future

    async def close(self, drain: bool = False) -> None:
        """Stops the worker; with `drain`, once every queued request has its answer."""
        while drain:
            busy = [t for t in (self._worker, *self._in_flight) if t is not None and not t.done()]
            if not busy:
                break
            await asyncio.wait(busy)
        tasks = [t for t in (self._worker, *self._in_flight) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _work(self) -> None:
        while self._queue:
            while len(self._in_flight) >= self._max_batches_in_flight:
                self._batch_done.clear()
                await self._batch_done.wait()
            await self._wait_for_batch()
            batch = self._take_batch()
            if batch:
                task = asyncio.get_running_loop().create_task(self._execute(batch))
                self._in_flight.add(task)
                task.add_done_callback(self._on_batch_done)

    def _on_batch_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._batch_done.set()

    def _batch_rows(self) -> list[int]:
        """The row counts of the requests the next batch may take, in arrival order: those shaped
        as the oldest, as many as fit in max_batch_size."""
        key = self._queue[0].key
        counts: list[int] = []
        rows = 0
        for pending in self._queue:
            if pending.key != key or pending.future.done():
                continue
            if rows + pending.rows > self._max_batch_size:
                break
            counts.append(pending.rows)
            rows += pending.rows
        return counts

    def _preferred_rows(self, counts: list[int]) -> int:
        """The largest preferred batch size that the requests of ``counts``, taken in order, make
        up exactly; 0 when none does."""
        best = rows = 0
        for count in counts:
            rows += count
            if rows in self._preferred:
                best = rows
        return best

    def _ready_to_run(self) -> bool:
        """A batch worth running without waiting longer: the requests shaped as the oldest fill
        max_batch_size (or the largest preferred size), or make up a preferred size in order."""
        key = self._queue[0].key
        waiting = sum(p.rows for p in self._queue if p.key == key and not p.future.done())
        return waiting >= self._enough_rows or self._preferred_rows(self._batch_rows()) > 0

    async def _wait_for_batch(self) -> None:
        """Waits until the oldest request's delay has passed or a batch worth running is queued."""
        deadline = self._queue[0].enqueued_at + self._max_queue_delay_s
        while not self._ready_to_run():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Pending]:
        """The next batch, out of the queue: the requests shaped as the oldest, in arrival order,
        up to the largest preferred size they make up (else up to max_batch_size). Requests whose
        timeout has passed are answered as timed out instead."""
        self._drop_expired()
        if not self._queue:
            return []
        key = self._queue[0].key
        limit = self._preferred_rows(self._batch_rows()) or self._max_batch_size
        batch: list[_Pending] = []
        kept: deque[_Pending] = deque()
        rows = 0
        while self._queue:
            pending = self._queue.popleft()
            if pending.future.done():  # the client went away
                continue
            if pending.key == key and rows + pending.rows <= limit:
                batch.append(pending)
                rows += pending.rows
            else:
                kept.append(pending)
        self._queue = kept
        return batch

    def _drop_expired(self) -> None:
        """Answers the queued requests whose timeout has passed (Triton's queue policy: they are
        rejected, never run)."""
        now = time.monotonic()
        kept: deque[_Pending] = deque()
        for pending in self._queue:
            if pending.expired(now) and not pending.future.done():
                waited = now - pending.enqueued_at
                pending.future.set_exception(
                    RequestTimedOutError(f"the request timed out after {waited:.3f} s in the queue")
                )
            elif not pending.future.done():
                kept.append(pending)
        self._queue = kept

    async def _execute(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        self._observe_batch(batch, started)
        try:
            if len(batch) == 1:
                results = [await self._call(batch[0].inputs, batch)]
            else:
                stacked = {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
                results = _split(await self._call(stacked, batch), [p.rows for p in batch])
        except Exception as exc:
            if len(batch) == 1:
                self._resolve(batch[0], exc)
                return
            # Find the culprit(s): every request runs alone and gets its own result or error.
            for pending in batch:
                try:
                    self._resolve(pending, await self._call(pending.inputs, [pending]))
                except Exception as single_exc:
                    self._resolve(pending, single_exc)
            return
        for pending, result in zip(batch, results, strict=True):
            self._resolve(pending, result)

    async def _call(self, inputs: dict[str, np.ndarray], served: list[_Pending]) -> dict[str, np.ndarray]:
        """One runtime call for the requests ``served``; each of them is charged its duration."""
        started = time.monotonic_ns()
        try:
            outputs = await asyncio.to_thread(self._run_batch, inputs)
        finally:
            took = time.monotonic_ns() - started
            if self._metrics is not None:
                self._metrics.runtime_seconds.labels(self._model_name).observe(took / 1e9)
        if self._stats is not None:  # the statistics count the executions that succeeded
            self._stats.executed(next(iter(inputs.values())).shape[0], took)
        for pending in served:
            pending.compute_ns = took
        return outputs

    def _resolve(self, pending: _Pending, outcome: dict[str, np.ndarray] | BaseException) -> None:
        if pending.future.done():
            return
        if isinstance(outcome, BaseException):
            pending.future.set_exception(outcome)
        else:
            pending.future.set_result(outcome)
            if self._stats is not None:  # a request's wait and its batch's run, where it was answered
                self._stats.queued(int((pending.started_at - pending.enqueued_at) * 1e9))
                self._stats.computed(pending.compute_ns)

    def _observe_batch(self, batch: list[_Pending], started: float) -> None:
        for pending in batch:
            pending.started_at = started
        if self._metrics is None:
            return
        self._metrics.batch_requests.labels(self._model_name).observe(len(batch))
        self._metrics.batch_rows.labels(self._model_name).observe(sum(p.rows for p in batch))
        for pending in batch:
            self._metrics.queue_seconds.labels(self._model_name).observe(started - pending.enqueued_at)
