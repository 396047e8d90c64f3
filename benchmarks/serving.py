"""HTTP serving overhead: N concurrent streaming clients against `inferd serve`, and the same workload
through the offline engine (`inferd.LLM`) in this process, with the same engine settings.

    python benchmarks/serving.py [--model DIR] [--concurrency 32] [--num-prompts 96] [--out results.json]

Without `--model` it uses the built-in default model. Prompts are random token ids (lengths clipped
to the context); replies are greedy with EOS ignored, so both paths generate the same token count.
The server runs as a subprocess on 127.0.0.1; the clients are `inferd.bench`'s streaming OpenAI client.

Offline and HTTP runs alternate (`--repeats` pairs) so both see the same background load; the loss
is the median over pairs. Each HTTP run also reports CPU time per output token of the server's
event loop (HTTP, JSON, SSE), of its engine threads, and of the client process: a measure of the
HTTP cost that does not depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferd.bench.client import OpenAIStreamClient
from inferd.bench.datasets import BenchRequest, LengthRange, clip_to_context, random_requests
from inferd.bench.offline import generate_timed
from inferd.bench.report import format_table, summarize
from inferd.bench.runner import RunResult, run_requests
from inferd.engine.builder import default_model_path

if TYPE_CHECKING:
    from inferd.llm import LLM

_READY = re.compile(r"inferd serving (\S+) at (http://127\.0\.0\.1:\d+)")
STARTUP_TIMEOUT_S = 120.0


def engine_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_num_seqs": args.concurrency, "kv_cache_memory": args.kv_cache_memory}


def load_offline(model: Path, args: argparse.Namespace) -> LLM:
    from inferd import LLM, SamplingParams

    llm = LLM(model, **engine_flags(args))
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0))  # warm-up
    return llm


def run_offline(llm: LLM, requests: list[BenchRequest]) -> dict[str, Any]:
    """One timed `generate` over the workload, on a worker thread as the server's engine runs.

    The thread matters on a busy CPU: torch's OpenMP workers spin-wait, and called from the main
    thread the engine ran up to 4x slower here than from any other thread (see BENCHMARKS.md).
    """
    with ThreadPoolExecutor(max_workers=1) as worker:
        result = worker.submit(generate_timed, llm, requests, False).result()
    return summarize(result.records, result.duration_s)


def start_server(model: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[str], str, str]:
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in engine_flags(args).items()]
    process = subprocess.Popen(
        [sys.executable, "-m", "inferd.cli", "serve", str(model), "--port", "0", *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    seen = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line)
        if match := _READY.search(line):
            # Keep reading the log so the server never blocks on a full pipe.
            _drain_in_background(process)
            return process, match.group(1), match.group(2)
    process.kill()
    raise RuntimeError("server did not start:\n" + "".join(seen))


def _drain_in_background(process: subprocess.Popen[str]) -> None:
    def drain() -> None:
        assert process.stderr is not None
        for _ in process.stderr:
            pass

    threading.Thread(target=drain, daemon=True).start()


async def drive_server(
    base_url: str, model_name: str, requests: list[BenchRequest], concurrency: int
) -> RunResult:
    client = OpenAIStreamClient(base_url, model_name, "completions", ignore_eos=True)
    try:
        return await run_requests(client.send, requests, max_concurrency=concurrency, show_progress=False)
    finally:
        await client.aclose()


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median output throughput (the CPU is shared, so single runs are noisy)."""
    return sorted(runs, key=lambda run: run["output_throughput"])[len(runs) // 2]


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of a process, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    times = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        times[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return times


def timed_server_run(
    process: subprocess.Popen[str],
    base_url: str,
    model_name: str,
    requests: list[BenchRequest],
    concurrency: int,
) -> dict[str, Any]:
    """One HTTP run, plus where the CPU went: the server's event loop (its main thread), the
    engine threads (everything else in the server) and this client process."""
    before, client_before = thread_cpu_s(process.pid), time.process_time()
    summary = summarize_run(asyncio.run(drive_server(base_url, model_name, requests, concurrency)))
    after, client_cpu = thread_cpu_s(process.pid), time.process_time() - client_before
    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    loop_cpu = spent.pop(process.pid, 0.0)
    tokens = summary["total_output_tokens"]
    summary["cpu_s"] = {"event_loop": loop_cpu, "engine": sum(spent.values()), "client": client_cpu}
    summary["cpu_us_per_output_token"] = {k: v / tokens * 1e6 for k, v in summary["cpu_s"].items()}
    return summary


def compare(model: Path, requests: list[BenchRequest], args: argparse.Namespace) -> dict[str, Any]:
    """Alternate offline and HTTP runs, so both see the same background load on average."""
    llm = load_offline(model, args)
    process, model_name, base_url = start_server(model, args)
    offline_runs, server_runs = [], []
    try:
        warm_up = [BenchRequest(prompt=[1, 2, 3, 4], max_tokens=4, input_len=4)]
        asyncio.run(drive_server(base_url, model_name, warm_up, 1))
        for repeat in range(args.repeats):
            offline_runs.append(run_offline(llm, requests))
            server_runs.append(timed_server_run(process, base_url, model_name, requests, args.concurrency))
            offline_tps, server_tps = (runs[-1]["output_throughput"] for runs in (offline_runs, server_runs))
            print(
                f"run {repeat + 1}: offline {offline_tps:.1f} tok/s, HTTP {server_tps:.1f} tok/s", flush=True
            )
    finally:
        process.terminate()
        process.wait(timeout=30)
    return {"offline_runs": offline_runs, "server_runs": server_runs}


def summarize_run(result: RunResult) -> dict[str, Any]:
    return summarize(result.records, result.duration_s)


def pair_ratios(runs: dict[str, Any]) -> list[float]:
    """HTTP over offline throughput of each back-to-back pair: drifts in background load cancel."""
    return [
        served["output_throughput"] / offline["output_throughput"]
        for offline, served in zip(runs["offline_runs"], runs["server_runs"], strict=True)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=96)
    parser.add_argument("--input-len", type=LengthRange.parse, default=LengthRange(32, 128))
    parser.add_argument("--output-len", type=LengthRange.parse, default=LengthRange(32, 128))
    parser.add_argument("--kv-cache-memory", default="1GiB")
    parser.add_argument("--repeats", type=int, default=3, help="alternating offline/HTTP runs; medians kept")
    parser.add_argument("--out", type=Path, default=None, help="write both summaries as JSON")
    args = parser.parse_args()

    model = args.model or default_model_path()
    config = json.loads((model / "config.json").read_text())
    vocab, context = config["vocab_size"], config["max_position_embeddings"]
    drawn = random_requests(args.num_prompts, args.input_len, args.output_len, 0, min(vocab, 10000))
    requests, clipped = clip_to_context(drawn, context)
    if clipped:
        print(f"note: some prompt/output lengths were clipped to the context of {context} tokens")
    runs = compare(model, requests, args)

    offline, served = median_run(runs["offline_runs"]), median_run(runs["server_runs"])
    print(format_table(offline, title="offline engine (inferd.LLM), median run"))
    print(format_table(served, title=f"HTTP, {args.concurrency} concurrent streams, median run"))
    ratios = sorted(pair_ratios(runs))
    loss = 1.0 - statistics.median(ratios)
    print(
        f"HTTP throughput loss vs offline: median of {len(ratios)} back-to-back pairs {loss:.1%} "
        f"(pairs range {1 - ratios[-1]:.1%} to {1 - ratios[0]:.1%})"
    )
    cpu = {k: sorted(r["cpu_us_per_output_token"][k] for r in runs["server_runs"]) for k in served["cpu_s"]}
    print(
        "CPU per output token (median, us): " + ", ".join(f"{k} {v[len(v) // 2]:.0f}" for k, v in cpu.items())
    )
    if args.out:
        machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()}
        report = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "machine": machine,
            "loss": loss,
            "cpu": cpu,
        }
        args.out.write_text(json.dumps({**report, **runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
