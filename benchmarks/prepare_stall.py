"""How long a client's stream stalls while the server tokenizes another client's long prompt.

A server of the built-in model, with its context raised to ``--context`` tokens (the weights are
the same; only the length limits grow), streams one long completion; meanwhile another client
sends prompts of ``--prompt-chars`` characters, too long for the context, so each costs the
server its tokenizing and then a 400. The figures are the gaps between the stream's chunks while
those prompts were in flight, and how long each long prompt took to be refused.

    python benchmarks/prepare_stall.py                       # 4 prompts of 900,000 characters
    python benchmarks/prepare_stall.py --prompt-chars 300000 --prompts 8

Run it with another tree's ``src`` first on ``PYTHONPATH`` to time that tree's server.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

import inferd

STARTUP_TIMEOUT_S = 120


def long_context_model(folder: Path, context: int) -> Path:
    """The built-in model's folder with ``max_position_embeddings`` raised to ``context``."""
    source = Path(inferd.__file__).parent / "data" / "default_model"
    shutil.copytree(source, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = context
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not start")


@contextmanager
def serving_long_context_model(context: int, *serve_args: str) -> Iterator[str]:
    """`inferd serve` of the built-in model with a context of ``context`` tokens on a free port
    (one torch thread), given ``serve_args`` too; yields its base URL and stops it on the way out."""
    with tempfile.TemporaryDirectory() as scratch:
        model = long_context_model(Path(scratch) / "model", context)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "inferd.cli", "serve", str(model), "--port", str(port), *serve_args]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        try:
            wait_ready(url, process)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)


def stream_arrivals(url: str, max_tokens: int, arrivals: list[float]) -> None:
    body = {"prompt": "ROMEO:", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--context", type=int, default=32768, help="the model's context, in tokens")
    parser.add_argument("--prompt-chars", type=int, default=900_000)
    parser.add_argument("--prompts", type=int, default=4, help="long prompts, one after the other")
    parser.add_argument("--stream-tokens", type=int, default=3000)
    args = parser.parse_args()
    with serving_long_context_model(args.context) as url:
        arrivals: list[float] = []
        streamer = threading.Thread(target=stream_arrivals, args=(url, args.stream_tokens, arrivals))
        streamer.start()
        while len(arrivals) < 50:  # the stream is under way
            time.sleep(0.01)
        text = ("the quick brown fox jumps over the lazy dog. " * (args.prompt_chars // 45 + 1))[
            : args.prompt_chars
        ]
        refusals = []
        window_start = time.perf_counter()
        with httpx.Client(timeout=600) as client:
            for _ in range(args.prompts):
                start = time.perf_counter()
                answer = client.post(f"{url}/v1/completions", json={"prompt": text, "max_tokens": 1})
                refusals.append((answer.status_code, time.perf_counter() - start))
        window_end = time.perf_counter()
        streamer.join()
    times = [t for t in arrivals if window_start <= t <= window_end]
    gaps = sorted(b - a for a, b in zip(times, times[1:], strict=False))
    quiet = sorted(b - a for a, b in zip(arrivals, arrivals[1:], strict=False) if b < window_start)
    print(f"server: {inferd.__file__}")
    print(f"long prompts: {args.prompts} x {args.prompt_chars:,} characters, answered "
          f"{sorted({s for s, _ in refusals})}, each in {statistics.median(s for _, s in refusals):.2f} s "
          "(median)")  # fmt: skip
    quiet_median, quiet_max = 1e3 * statistics.median(quiet), 1e3 * quiet[-1]
    print(f"stream gaps before them: median {quiet_median:.1f} ms, max {quiet_max:.1f} ms")
    if gaps:
        p99 = gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))]
        print(f"stream gaps while they ran: {len(gaps)} gaps, median {1e3 * statistics.median(gaps):.1f} ms, "
              f"p99 {1e3 * p99:.1f} ms, max {1e3 * gaps[-1]:.1f} ms")  # fmt: skip
    else:
        print("stream gaps while they ran: none (no chunk arrived while the long prompts ran)")


if __name__ == "__main__":
    main()
