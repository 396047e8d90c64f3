"""KServe v2 digits benchmark: requests/s and latency percentiles with dynamic batching on and off.

Starts `python -m inferd.server.kserve` on free 127.0.0.1 ports with a copy of examples/models/digits
(once with `dynamic_batching: true`, once with `false`; otherwise identical), then `--clients`
concurrent clients each send single-image v2 REST requests (JSON) back to back for `--duration`
seconds after a warm-up. Prints a Markdown table.

    python benchmarks/kserve_digits.py [--clients 64] [--duration 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "models" / "digits"
STARTUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Result:
    mode: str
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _repository(root: Path, dynamic_batching: bool) -> Path:
    target = root / ("on" if dynamic_batching else "off")
    shutil.copytree(DIGITS, target / "digits")
    config_path = target / "digits" / "model.json"
    config = json.loads(config_path.read_text())
    config["dynamic_batching"] = dynamic_batching
    config_path.write_text(json.dumps(config))
    return target


def _start_server(repository: Path, port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "inferd.server.kserve", "--model-repository", str(repository)]
    command += ["--port", str(port), "--grpc-port", str(_free_port())]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("server exited during startup")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/models/digits/ready", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise TimeoutError("server did not become ready")


def _bodies(count: int) -> list[bytes]:
    images = np.random.default_rng(0).uniform(0, 16, size=(count, 8, 8)).round(2)
    return [
        json.dumps(
            {
                "inputs": [
                    {"name": "image", "datatype": "FP32", "shape": [1, 8, 8], "data": image.ravel().tolist()}
                ]
            }
        ).encode()
        for image in images
    ]


async def _client(
    http: httpx.AsyncClient, bodies: list[bytes], stop_at: float, record: bool, out: list[float]
) -> int:
    """Sends requests back to back until `stop_at`; returns the number of failed ones."""
    errors = 0
    index = 0
    while time.monotonic() < stop_at:
        started = time.perf_counter()
        response = await http.post("/v2/models/digits/infer", content=bodies[index % len(bodies)])
        if response.status_code != 200:
            errors += 1
        elif record:
            out.append((time.perf_counter() - started) * 1000.0)
        index += 1
    return errors


async def _load(port: int, clients: int, duration: float, warmup: float) -> tuple[list[float], int, float]:
    bodies = _bodies(256)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=limits, headers=headers, timeout=60
    ) as http:
        warm_until = time.monotonic() + warmup
        await asyncio.gather(*(_client(http, bodies, warm_until, False, []) for _ in range(clients)))
        latencies: list[float] = []
        started = time.monotonic()
        errors = await asyncio.gather(
            *(_client(http, bodies, started + duration, True, latencies) for _ in range(clients))
        )
        return latencies, sum(errors), time.monotonic() - started


def run_mode(root: Path, dynamic_batching: bool, clients: int, duration: float, warmup: float) -> Result:
    port = _free_port()
    server = _start_server(_repository(root, dynamic_batching), port)
    try:
        latencies, errors, seconds = asyncio.run(_load(port, clients, duration, warmup))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return Result("on" if dynamic_batching else "off", len(latencies), errors, seconds, latencies)


def markdown(results: list[Result], clients: int) -> str:
    lines = [
        "| dynamic batching | clients | requests/s | P50 ms | P95 ms | P99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.mode} | {clients} | {r.throughput:.0f} | {r.percentile(50):.1f} | "
            f"{r.percentile(95):.1f} | {r.percentile(99):.1f} | {r.errors} |"
        )
    on, off = results
    lines.append("")
    lines.append(f"Throughput ratio on/off: {on.throughput / off.throughput:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_mode(Path(tmp), on, args.clients, args.duration, args.warmup) for on in (True, False)]
    print(markdown(results, args.clients))


if __name__ == "__main__":
    main()
