"""A sliding-window model under a small KV pool, with and without giving back the blocks behind each
request's window (``KVCacheManager.release_out_of_window``): how many requests run at once, how
often the scheduler preempts, and the throughput that follows.

A random-weight Mistral (width 512, 8 layers, 8 heads over 4 KV heads, vocabulary 4096, every layer
sliding over ``--window`` positions; the loader's dummy weights) takes ``--requests`` prompts of
``--prompt`` tokens at once, each generating ``--max-tokens`` tokens greedily with EOS ignored, from
a pool of ``--blocks`` blocks of 16 tokens. "holding" is the same engine with the window hidden
from its KV manager, so every request keeps all its blocks, as before the release existed. Both
engines are built first and run in turn ``--repeats`` times after a warm-up; prints the medians.

    python benchmarks/sliding_window_kv.py [--blocks 192] [--repeats 1] [--out results.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import gpu  # noqa: E402  (the tokenizer-only model folder)
import long_prefill  # noqa: E402  (its model's shape)

from inferd import LLM, SamplingParams  # noqa: E402
from inferd.engine import core  # noqa: E402

# long_prefill.py's model as a Mistral, whose config takes a sliding window.
SHAPE = {**long_prefill.SHAPE, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")


def workload(args: argparse.Namespace) -> tuple[Path, list[list[int]]]:
    """The model folder (its window ``--window``) and the ``--requests`` prompts."""
    shape = {**SHAPE, "sliding_window": args.window}
    folder = gpu.write_model_folder(Path(tempfile.mkdtemp()) / "model", shape)
    vocab = SHAPE["vocab_size"]
    prompts = [[(7 * i + 13 * j) % (vocab - 3) + 3 for j in range(args.prompt)] for i in range(args.requests)]
    return folder, prompts


def build(folder: Path, args: argparse.Namespace, release: bool) -> LLM:
    options: dict[str, Any] = {
        "load_format": "dummy", "max_model_len": args.prompt + args.max_tokens, "num_kv_blocks": args.blocks,
        "block_size": 16, "kv_cache_memory": "1GiB", "seed": 0,
    }  # fmt: skip
    if release:
        return LLM(folder, **options)
    windowed = core.kv_window
    core.kv_window = lambda layer_windows: 0  # type: ignore[assignment]
    try:
        return LLM(folder, **options)
    finally:
        core.kv_window = windowed


def run_once(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict[str, Any]:
    preemptions = llm.engine.stats().num_preemptions
    running: list[int] = []
    step = llm.engine.step

    def counted_step():  # type: ignore[no-untyped-def]
        running.append(llm.engine.stats().num_running)
        return step()

    llm.engine.step = counted_step  # type: ignore[method-assign]
    start = time.perf_counter()
    try:
        outputs = llm.generate(prompts, params)
    finally:
        del llm.engine.step
    wall = time.perf_counter() - start
    generated = sum(len(out.token_ids) for out in outputs)
    return {
        "wall_s": wall,
        "output_tok_s": generated / wall,
        "preemptions": llm.engine.stats().num_preemptions - preemptions,
        "mean_running": statistics.fmean(running),
        "tokens": [out.token_ids for out in outputs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_arguments(parser)
    args = parser.parse_args()
    folder, prompts = workload(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    engines = {"releasing": build(folder, args, release=True), "holding": build(folder, args, release=False)}
    for llm in engines.values():
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, llm in engines.items():
            llm.reset_prefix_cache()  # every round computes every prompt
            runs[name].append(run_once(llm, prompts, params))
    reference = runs["holding"][0]["tokens"]
    figures = {}
    for name, results in runs.items():
        figures[name] = {
            key: statistics.median(r[key] for r in results)
            for key in ("wall_s", "output_tok_s", "preemptions", "mean_running")
        }
        figures[name]["same_tokens_as_holding"] = results[0]["tokens"] == reference
    print(f"{'engine':>10} {'wall s':>8} {'out tok/s':>10} {'preemptions':>12} {'mean running':>13}")
    for name, f in figures.items():
        print(f"{name:>10} {f['wall_s']:>8.2f} {f['output_tok_s']:>10.1f} {f['preemptions']:>12.0f} "
              f"{f['mean_running']:>13.1f}  same tokens: {f['same_tokens_as_holding']}")  # fmt: skip
    if args.out:
        long_prefill.write_figures(args, figures)


if __name__ == "__main__":
    main()
