"""HTTP serving overhead: N concurrent streaming clients against `inferd serve`, and the same workload
through the offline engine (`inferd.LLM`) in this process, with the same engine settings.

    python benchmarks/serving.py [--model DIR] [--concurrency 32] [--num-prompts 96] [--out results.json]

Without `--model` it uses the built-in default model, or, while that does not exist yet, random
weights in its shape (Llama, 4 layers, hidden 256, vocabulary 4096). Prompts are random token ids;
replies are greedy with EOS ignored, so both paths generate exactly the same number of tokens.
The server runs as a subprocess on 127.0.0.1; the clients are `inferd.bench`'s streaming OpenAI client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferd.bench.client import OpenAIStreamClient
from inferd.bench.datasets import BenchRequest, LengthRange, random_requests
from inferd.bench.offline import generate_timed
from inferd.bench.report import format_table, summarize
from inferd.bench.runner import RunResult, run_requests
from inferd.engine.builder import default_model_path

if TYPE_CHECKING:
    from inferd.llm import LLM

# The built-in default model's shape (scripts/train_default_model.py defaults).
DEFAULT_MODEL_SHAPE = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}
_READY = re.compile(r"inferd serving (\S+) at (http://127\.0\.0\.1:\d+)")
STARTUP_TIMEOUT_S = 120.0


def build_stand_in_model(folder: Path) -> Path:
    """Random weights in the default model's shape, with a word-level tokenizer covering its vocabulary."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    config = transformers.LlamaConfig(**DEFAULT_MODEL_SHAPE, eos_token_id=0, bos_token_id=0)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(DEFAULT_MODEL_SHAPE["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w0"}))
    return folder


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
    results: list[RunResult] = []
    worker = threading.Thread(
        target=lambda: results.append(generate_timed(llm, requests, show_progress=False))
    )
    worker.start()
    worker.join()
    return summarize(results[0].records, results[0].duration_s)


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
            server_runs.append(
                summarize_run(asyncio.run(drive_server(base_url, model_name, requests, args.concurrency)))
            )
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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=96)
    parser.add_argument("--input-len", type=LengthRange.parse, default=LengthRange(64, 192))
    parser.add_argument("--output-len", type=LengthRange.parse, default=LengthRange(64, 192))
    parser.add_argument("--kv-cache-memory", default="1GiB")
    parser.add_argument("--repeats", type=int, default=3, help="alternating offline/HTTP runs; medians kept")
    parser.add_argument("--out", type=Path, default=None, help="write both summaries as JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            model = default_model_path()
            if not (model / "config.json").is_file():
                print("built-in default model not found; using random weights in its shape")
                model = build_stand_in_model(Path(scratch) / "default-shape")
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        requests = random_requests(args.num_prompts, args.input_len, args.output_len, 0, min(vocab, 10000))
        runs = compare(model, requests, args)

    offline, served = median_run(runs["offline_runs"]), median_run(runs["server_runs"])
    print(format_table(offline, title="offline engine (inferd.LLM), median run"))
    print(format_table(served, title=f"HTTP, {args.concurrency} concurrent streams, median run"))
    loss = 1.0 - served["output_throughput"] / offline["output_throughput"]
    print(f"HTTP throughput loss vs offline (medians of {args.repeats}): {loss:.1%}")
    if args.out:
        machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()}
        report = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine, "loss": loss}
        args.out.write_text(json.dumps({**report, **runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
