"""The dynamic batcher: stacking within the delay, the size cap, splitting, failure isolation, metrics."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from inferd.serving.batcher import DynamicBatcher
from inferd.serving.metrics import ServingMetrics

POISON = -1.0


class RecordingModel:
    """Doubles its input; refuses any batch containing POISON. Records the rows of every call."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self._lock = threading.Lock()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        with self._lock:
            self.calls.append(x.shape[0])
        if (x == POISON).any():
            raise ValueError("poisoned input")
        return {"y": x * 2, "row_sum": x.sum(axis=1, keepdims=True)}


def _request(value: float, rows: int = 1, width: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, width), value, dtype=np.float32)}


async def test_requests_within_the_delay_run_as_one_call_and_are_split_back() -> None:
    model = RecordingModel()
    batcher = DynamicBatcher("m", model.infer, max_batch_size=16, max_queue_delay_s=0.5)
    results = await asyncio.gather(*(batcher.submit(_request(float(i), rows=i % 2 + 1)) for i in range(6)))
    await batcher.close()
    assert model.calls == [9]  # 3 requests of 1 row + 3 of 2 rows, one call
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], _request(float(i), rows=i % 2 + 1)["x"] * 2)
        assert result["row_sum"].shape == (i % 2 + 1, 1)


async def test_a_full_batch_runs_without_waiting_for_the_delay() -> None:
    model = RecordingModel()
    batcher = DynamicBatcher("m", model.infer, max_batch_size=4, max_queue_delay_s=30.0)
    # With a 30 s delay this only finishes quickly (well within the test timeout) if full batches go at once.
    await asyncio.wait_for(asyncio.gather(*(batcher.submit(_request(1.0)) for _ in range(8))), timeout=10)
    await batcher.close()
    assert model.calls == [4, 4]


async def test_batches_never_exceed_max_batch_size() -> None:
    model = RecordingModel()
    batcher = DynamicBatcher("m", model.infer, max_batch_size=5, max_queue_delay_s=0.05)
    await asyncio.gather(*(batcher.submit(_request(1.0, rows=2)) for _ in range(7)))
    await batcher.close()
    assert sum(model.calls) == 14 and max(model.calls) <= 5


async def test_requests_with_different_shapes_are_not_stacked() -> None:
    model = RecordingModel()
    batcher = DynamicBatcher("m", model.infer, max_batch_size=16, max_queue_delay_s=0.2)
    narrow, wide = await asyncio.gather(
        batcher.submit(_request(1.0, width=2)), batcher.submit(_request(1.0, width=5))
    )
    await batcher.close()
    assert sorted(model.calls) == [1, 1]
    assert narrow["y"].shape == (1, 2) and wide["y"].shape == (1, 5)


async def test_a_bad_request_in_a_batch_fails_alone() -> None:
    model = RecordingModel()
    batcher = DynamicBatcher("m", model.infer, max_batch_size=16, max_queue_delay_s=0.5)
    values = [1.0, 2.0, POISON, 4.0]
    results = await asyncio.gather(*(batcher.submit(_request(v)) for v in values), return_exceptions=True)
    await batcher.close()
    assert isinstance(results[2], ValueError)
    for value, result in zip(values, results, strict=True):
        if value != POISON:
            np.testing.assert_array_equal(result["y"], _request(value)["x"] * 2)
    assert model.calls[0] == 4  # stacked first, then each request alone


async def test_statistics_count_the_executions_and_waits_that_succeeded() -> None:
    """Triton's statistics: the stacked call that failed and the poisoned request's own call are no
    executions; the three answered requests each waited once."""
    from inferd.serving.statistics import ModelStatistics

    stats = ModelStatistics()
    batcher = DynamicBatcher(
        "m", RecordingModel().infer, max_batch_size=16, max_queue_delay_s=0.5, stats=stats
    )
    values = [1.0, 2.0, POISON, 4.0]
    await asyncio.gather(*(batcher.submit(_request(v)) for v in values), return_exceptions=True)
    await batcher.close()
    assert stats.execution_count == 3 and stats.compute_infer.count == 3
    assert sorted(stats.batches) == [1] and stats.batches[1].count == 3
    assert stats.queue.count == 3


async def test_oversized_request_is_refused() -> None:
    batcher = DynamicBatcher("m", RecordingModel().infer, max_batch_size=2, max_queue_delay_s=0.0)
    with pytest.raises(ValueError, match="max_batch_size"):
        await batcher.submit(_request(1.0, rows=3))


async def test_batch_metrics_go_to_the_given_registry() -> None:
    registry = CollectorRegistry()
    batcher = DynamicBatcher("digits", RecordingModel().infer, 8, 0.5, ServingMetrics(registry))
    await asyncio.gather(*(batcher.submit(_request(1.0)) for _ in range(3)))
    await batcher.close()
    labels = {"model": "digits"}
    assert registry.get_sample_value("inferd_kserve_batch_requests_count", labels) == 1
    assert registry.get_sample_value("inferd_kserve_batch_requests_sum", labels) == 3
    assert registry.get_sample_value("inferd_kserve_batch_rows_sum", labels) == 3
    assert registry.get_sample_value("inferd_kserve_queue_seconds_count", labels) == 3


async def test_the_next_batch_starts_while_one_is_still_running() -> None:
    second_call_started = threading.Event()
    calls = 0

    def infer(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        nonlocal calls
        calls += 1
        if calls == 1:
            # Bounded wait: without overlapping batches the second call never starts and this times out.
            assert second_call_started.wait(timeout=10)
        else:
            second_call_started.set()
        return {"y": inputs["x"]}

    batcher = DynamicBatcher("m", infer, max_batch_size=1, max_queue_delay_s=0.0)
    await asyncio.gather(batcher.submit(_request(1.0)), batcher.submit(_request(2.0)))
    await batcher.close()
    assert calls == 2


async def test_a_preferred_batch_size_runs_at_once_and_caps_the_batch() -> None:
    """Triton's preferred_batch_size: 12 requests queued together run as batches of 4, each at
    once (the 30 s delay would otherwise hold the first), not as one batch of 12."""
    model = RecordingModel()
    batcher = DynamicBatcher("m", model.infer, 16, max_queue_delay_s=30.0, preferred_batch_sizes=(4,))
    await asyncio.wait_for(asyncio.gather(*(batcher.submit(_request(1.0)) for _ in range(12))), timeout=10)
    await batcher.close()
    assert model.calls == [4, 4, 4]


async def test_the_largest_preferred_size_reached_is_taken() -> None:
    model = RecordingModel()
    batcher = DynamicBatcher("m", model.infer, 16, max_queue_delay_s=30.0, preferred_batch_sizes=(2, 6))
    requests = [batcher.submit(_request(1.0)) for _ in range(8)]
    await asyncio.wait_for(asyncio.gather(*requests), timeout=10)
    await batcher.close()
    assert model.calls == [6, 2]


async def test_without_a_preferred_size_reached_the_delay_is_waited_out() -> None:
    model = RecordingModel()
    batcher = DynamicBatcher("m", model.infer, 16, max_queue_delay_s=0.3, preferred_batch_sizes=(4,))
    started = asyncio.get_running_loop().time()
    await asyncio.gather(*(batcher.submit(_request(1.0)) for _ in range(3)))
    await batcher.close()
    assert model.calls == [3] and asyncio.get_running_loop().time() - started >= 0.25


async def test_a_request_whose_timeout_passes_in_the_queue_is_refused_not_run() -> None:
    """Triton's request timeout: dropped when the batch is formed (here at the end of the delay),
    answered as timed out; the request beside it without one runs."""
    from inferd.serving.errors import RequestTimedOutError

    model = RecordingModel()
    batcher = DynamicBatcher("m", model.infer, 16, max_queue_delay_s=0.3)
    hurried, patient = await asyncio.gather(
        batcher.submit(_request(1.0), timeout_s=0.05), batcher.submit(_request(2.0)), return_exceptions=True
    )
    await batcher.close()
    assert isinstance(hurried, RequestTimedOutError) and "timed out" in str(hurried)
    np.testing.assert_array_equal(patient["y"], _request(2.0)["x"] * 2)  # type: ignore[index]
    assert model.calls == [1]


async def test_a_timeout_not_reached_changes_nothing() -> None:
    model = RecordingModel()
    batcher = DynamicBatcher("m", model.infer, 16, max_queue_delay_s=0.05)
    result = await batcher.submit(_request(3.0), timeout_s=5.0)
    await batcher.close()
    np.testing.assert_array_equal(result["y"], _request(3.0)["x"] * 2)


async def test_each_request_is_charged_its_batchs_duration_as_triton_counts() -> None:
    """inference_stats count requests (each charged its whole batch's duration, so a tool dividing
    by the successes reads one request's compute time); execution_count and batch_stats count the
    runtime calls."""
    from inferd.serving.statistics import ModelStatistics

    stats = ModelStatistics()
    batcher = DynamicBatcher("m", RecordingModel().infer, 16, max_queue_delay_s=0.5, stats=stats)
    await asyncio.gather(*(batcher.submit(_request(1.0)) for _ in range(4)))
    await batcher.close()
    assert stats.execution_count == 1 and stats.batches[4].count == 1
    assert stats.compute_infer.count == 4 and stats.compute_infer.ns == 4 * stats.batches[4].ns
    described = stats.to_json("m", "1")
    assert described["inference_stats"]["compute_input"] == {"count": 4, "ns": 0}
    assert described["batch_stats"][0]["compute_output"] == {"count": 1, "ns": 0}
