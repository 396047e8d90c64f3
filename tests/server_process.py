"""Runs a real `inferd serve` subprocess on a free 127.0.0.1 port for the server tests."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

_READY = re.compile(r"inferd serving (\S+) at (https?://127\.0\.0\.1:\d+)")
STARTUP_TIMEOUT_S = 90.0


@dataclass
class ServerProcess:
    base_url: str
    model: str
    process: subprocess.Popen[str]
    log_lines: list[str] = field(default_factory=list)

    def log_text(self) -> str:
        return "\n".join(self.log_lines)

    def wait_for_log(self, fragment: str, timeout_s: float = 10.0) -> str:
        """The first log line holding `fragment`, waiting for the server's output to be read."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.log_lines):
                if fragment in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line with {fragment!r}:\n{self.log_text()}")

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as `name{label="v",...}` -> value (model_name label left out)."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = {k: v for k, v in sample.labels.items() if k != "model_name"}
                key = sample.name + "".join(f"{{{k}={v}}}" for k, v in sorted(labels.items()))
                samples[key] = sample.value
        return samples

    def wait_for_metrics(self, check, timeout_s: float = 20.0) -> dict[str, float]:  # type: ignore[no-untyped-def]
        """Polls /metrics until `check(samples)` holds; returns those samples (asserts on timeout)."""
        deadline = time.monotonic() + timeout_s
        samples = self.metrics()
        while not check(samples) and time.monotonic() < deadline:
            time.sleep(0.05)
            samples = self.metrics()
        assert check(samples), f"metrics never reached the expected state: {samples}"
        return samples


def _pump(stream, lines: list[str], ready: queue.Queue[str]) -> None:  # type: ignore[no-untyped-def]
    for line in stream:
        lines.append(line.rstrip("\n"))
        if _READY.search(line):
            ready.put(line)
    ready.put("")  # the process closed its output: it has exited


@contextmanager
def run_server(
    model_path: Path, *extra_args: str, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    command = [sys.executable, "-m", "inferd.cli", "serve", str(model_path), "--port", "0", *extra_args]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    lines: list[str] = []
    ready: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines, ready), daemon=True).start()
    try:
        try:
            line = ready.get(timeout=STARTUP_TIMEOUT_S)
        except queue.Empty:
            line = ""
        match = _READY.search(line)
        assert match, "server did not start:\n" + "\n".join(lines)
        yield ServerProcess(base_url=match.group(2), model=match.group(1), process=process, log_lines=lines)
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if the server has not exited within 20 s."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=20)
