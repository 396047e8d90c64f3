"""The v2 data plane's request metrics: each request's time in the server by outcome, and the
requests being answered (Triton exports both per model: its request duration and pending count)."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import httpx
import numpy as np
from prometheus_client import CollectorRegistry

from inferd.server.kserve.launch import build_app, open_repository
from inferd.serving.runtimes.registry import default_runtime_registry

CONFIG = {
    "runtime": "gated",
    "max_batch_size": 0,
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [2]}],
}
INPUT = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}]}


class Failing:
    """A runtime whose own code fails: an internal error, not the request's."""

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise RuntimeError("the runtime fell over")


class Gated:
    """Answers once the test opens the gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.set()
        assert self.gate.wait(10), "the test never opened the gate"
        return {"y": inputs["x"]}


async def test_requests_in_flight_and_their_time_by_outcome(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.json").write_text(json.dumps(CONFIG))
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "model.json").write_text(json.dumps({**CONFIG, "runtime": "failing"}))
    runtime = Gated()
    runtimes = default_runtime_registry()
    runtimes.register("gated", lambda folder, config: runtime, platform="python")
    runtimes.register("failing", lambda folder, config: Failing(), platform="python")
    registry = CollectorRegistry()
    app = build_app(open_repository(tmp_path, registry, runtimes), registry)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"model": "m", **labels})

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://v2") as client:
        answer = asyncio.ensure_future(client.post("/v2/models/m/infer", json=INPUT))
        assert await asyncio.to_thread(runtime.entered.wait, 10)
        assert value("inferd_kserve_requests_in_flight") == 1
        runtime.gate.set()
        assert (await answer).status_code == 200
        wrong = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1.0, 2.0, 3.0]}]}
        assert (await client.post("/v2/models/m/infer", json=wrong)).status_code == 400
        assert (await client.post("/v2/models/f/infer", json=INPUT)).status_code == 400  # as before
    assert value("inferd_kserve_requests_in_flight") == 0
    assert value("inferd_kserve_request_seconds_count", outcome="success") == 1
    assert value("inferd_kserve_request_seconds_count", outcome="failure") == 1
    assert value("inferd_kserve_requests_total", outcome="failure") == 1
    # Why each failed, as a fixed set of reasons: the request's wrong shape, the runtime's own error.
    assert value("inferd_kserve_request_failures_total", reason="invalid_input") == 1
    failures = "inferd_kserve_request_failures_total"
    assert registry.get_sample_value(failures, {"model": "f", "reason": "runtime"}) == 1
