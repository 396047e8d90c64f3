"""Short prompts queued behind a long one, with and without a long-prefill threshold (vLLM's
``long_prefill_token_threshold``): how soon the short ones get their first token, and what the
long one pays for sharing its steps.

A random-weight Llama (width 512, 8 layers, 8 heads over 4 KV heads, vocabulary 4096; the
loader's dummy weights) takes one prompt of ``--long`` tokens, then ``--shorts`` prompts of
``--short`` tokens, all at once, each generating ``--max-tokens`` tokens greedily with EOS ignored,
under the default budget of 2048 tokens a step. One engine per threshold (0: none), all built
first; each timed round runs every engine once, in turn, so the machine's drift falls on all of
them alike. Prints the medians over ``--repeats`` rounds (after a warm-up round): the long prompt's
time to first token, the short ones' median and worst, and the whole batch's time.

    python benchmarks/long_prefill.py [--thresholds 0 256 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import gpu  # noqa: E402  (the tokenizer-only model folder)

from inferd import LLM, SamplingParams  # noqa: E402

SHAPE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 4096, "hidden_size": 512,
    "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip


def run_once(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict[str, Any]:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    ttfts = [out.metrics.ttft_s for out in outputs]
    assert all(t is not None for t in ttfts)
    short = [float(t) for t in ttfts[1:] if t is not None]
    return {
        "long_ttft_s": float(ttfts[0] or 0.0),
        "short_ttft_median_s": statistics.median(short),
        "short_ttft_max_s": max(short),
        "batch_s": wall,
        "tokens": [out.token_ids for out in outputs],
    }


def write_figures(args: argparse.Namespace, figures: dict[Any, Any]) -> None:
    """The figures to ``args.out`` as JSON, with the machine and the arguments."""
    machine = {"processor": platform.processor() or platform.machine(), "python": platform.python_version()}
    written = {"machine": machine, "args": vars(args) | {"out": str(args.out)}, "figures": figures}
    args.out.write_text(json.dumps(written, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--thresholds", type=int, nargs="+", default=[0, 256, 512])
    parser.add_argument("--long", type=int, default=6000)
    parser.add_argument("--short", type=int, default=64)
    parser.add_argument("--shorts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    folder = gpu.write_model_folder(Path(tempfile.mkdtemp()) / "model", SHAPE)
    vocab = SHAPE["vocab_size"]
    prompts = [[(13 * j) % (vocab - 3) + 3 for j in range(args.long)]]
    prompts += [[(7 * i + j) % (vocab - 3) + 3 for j in range(args.short)] for i in range(1, args.shorts + 1)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    engines = {
        threshold: LLM(
            folder,
            load_format="dummy",
            max_model_len=8192,
            max_num_batched_tokens=2048,
            kv_cache_memory="1GiB",
            long_prefill_token_threshold=threshold,
            seed=0,
        )  # fmt: skip
        for threshold in args.thresholds
    }
    runs: dict[int, list[dict[str, Any]]] = {threshold: [] for threshold in engines}
    for round_index in range(args.repeats + 1):
        for threshold, llm in engines.items():
            llm.reset_prefix_cache()  # every round computes every prompt
            result = run_once(llm, prompts, params)
            if round_index:  # the first round warms up
                runs[threshold].append(result)
    reference = runs[args.thresholds[0]][0]["tokens"]
    figures = {}
    for threshold, results in runs.items():
        figures[threshold] = {
            key: statistics.median(r[key] for r in results)
            for key in ("long_ttft_s", "short_ttft_median_s", "short_ttft_max_s", "batch_s")
        }
        figures[threshold]["same_tokens_as_first"] = results[0]["tokens"] == reference
    header = ("threshold", "long TTFT s", "short TTFT p50 s", "short TTFT max s", "batch s")
    print(f"{header[0]:>9} {header[1]:>12} {header[2]:>17} {header[3]:>17} {header[4]:>8}")
    for threshold, f in figures.items():
        times = f"{f['long_ttft_s']:>12.2f} {f['short_ttft_median_s']:>17.2f} {f['short_ttft_max_s']:>17.2f}"
        print(f"{threshold:>9} {times} {f['batch_s']:>8.2f}  same tokens: {f['same_tokens_as_first']}")
    if args.out:
        write_figures(args, figures)


if __name__ == "__main__":
    main()
