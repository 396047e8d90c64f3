"""KServe v2 digits benchmark: requests/s and latency percentiles with dynamic batching on and off.

Starts `python -m inferd.server.kserve` on free 127.0.0.1 ports with a copy of examples/models/digits
(with `dynamic_batching: true`, and with `false`; otherwise identical), then `--clients`
concurrent clients each send single-image v2 REST requests (JSON) back to back for `--duration`
seconds after a warm-up. The two modes alternate for `--rounds` rounds; throughput is total requests
over total time, latency percentiles pool all rounds. Prints a Markdown table.

    python benchmarks/kserve_digits.py [--clients 64] [--duration 10] [--rounds 3]
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


class _Connection:
    """A minimal keep-alive HTTP/1.1 client: the load generator shares the CPUs with the server, so it
    must cost far less per request than the server does (httpx costs about as much)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> _Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, request: bytes) -> int:
        self._writer.write(request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await self._reader.readexactly(length)
        return status

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


def _requests(port: int, count: int) -> list[bytes]:
    head = "POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    head += "Content-Type: application/json\r\n"
    return [
        (head.format(port=port) + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        for body in _bodies(count)
    ]


async def _client(
    port: int, requests: list[bytes], warm_until: float, stop_at: float, out: list[float]
) -> int:
    """Sends requests back to back until `stop_at`, recording latencies after `warm_until`; returns errors."""
    connection = await _Connection.open(port)
    errors = 0
    index = 0
    try:
        while (now := time.monotonic()) < stop_at:
            started = time.perf_counter()
            status = await connection.post(requests[index % len(requests)])
            index += 1
            if now < warm_until:
                continue
            if status != 200:
                errors += 1
            else:
                out.append((time.perf_counter() - started) * 1000.0)
    finally:
        await connection.close()
    return errors


async def _load(port: int, clients: int, duration: float, warmup: float) -> tuple[list[float], int, float]:
    requests = _requests(port, 256)
    latencies: list[float] = []
    warm_until = time.monotonic() + warmup
    stop_at = warm_until + duration
    errors = await asyncio.gather(
        *(_client(port, requests, warm_until, stop_at, latencies) for _ in range(clients))
    )
    return latencies, sum(errors), duration


def run_mode(root: Path, dynamic_batching: bool, clients: int, duration: float, warmup: float) -> Result:
    port = _free_port()
    server = _start_server(_repository(root, dynamic_batching), port)
    try:
        latencies, errors, seconds = asyncio.run(_load(port, clients, duration, warmup))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return Result("on" if dynamic_batching else "off", len(latencies), errors, seconds, latencies)


def _combine(rounds: list[Result]) -> Result:
    """All rounds of one mode: requests and seconds summed, latencies pooled."""
    return Result(
        rounds[0].mode,
        sum(r.requests for r in rounds),
        sum(r.errors for r in rounds),
        sum(r.seconds for r in rounds),
        [latency for r in rounds for latency in r.latencies_ms],
    )


def markdown(results: list[Result], clients: int, per_round: dict[str, list[float]]) -> str:
    lines = [
        "| dynamic batching | clients | requests/s | P50 ms | P95 ms | P99 ms | errors | req/s by round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rounds = ", ".join(f"{x:.0f}" for x in per_round[r.mode])
        lines.append(
            f"| {r.mode} | {clients} | {r.throughput:.0f} | {r.percentile(50):.1f} | "
            f"{r.percentile(95):.1f} | {r.percentile(99):.1f} | {r.errors} | {rounds} |"
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
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument(
        "--rounds", type=int, default=3, help="on/off runs alternate, to share any load drift"
    )
    args = parser.parse_args()
    by_mode: dict[str, list[Result]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for on in (True, False):
                root = Path(tmp) / f"round{round_index}"
                result = run_mode(root, on, args.clients, args.duration, args.warmup)
                by_mode[result.mode].append(result)
    per_round = {mode: [r.throughput for r in results] for mode, results in by_mode.items()}
    print(markdown([_combine(by_mode["on"]), _combine(by_mode["off"])], args.clients, per_round))


if __name__ == "__main__":
    main()
