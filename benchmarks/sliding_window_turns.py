"""Second turns of conversations on a sliding-window model whose first turns ran in a small KV pool:
how much of each second turn the prefix cache finds, with a lookup that wants only the blocks the
first query to compute can see (the window's, ``KVCacheManager._longest_windowed_hit``) and with
one that walks from the head (as before it).

``sliding_window_kv.py``'s random-weight Mistral (every layer sliding over ``--window`` positions)
first runs ``--requests`` prompts of ``--prompt`` tokens at once, each generating ``--max-tokens``
tokens greedily with EOS ignored, from a pool of ``--blocks`` blocks of 16 tokens: the blocks each
request gives back behind its window are taken by the others, so its head is evicted. Then every
conversation comes back, its first turn and ``--new`` new tokens, for ``--answer`` tokens more; the
second round is timed. Both engines run in turn ``--repeats`` times after a warm-up, each round from
an empty prefix cache; prints the medians.

    python benchmarks/sliding_window_turns.py [--repeats 1] [--out results.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import long_prefill  # noqa: E402  (its figures' JSON)
from sliding_window_kv import SHAPE, add_workload_arguments, workload  # noqa: E402

from inferd import LLM, SamplingParams  # noqa: E402
from inferd.kv.manager import KVCacheManager  # noqa: E402


def build(folder: Path, args: argparse.Namespace, windowed: bool) -> LLM:
    llm = LLM(
        folder,
        load_format="dummy",
        max_model_len=args.prompt + args.max_tokens + args.new + args.answer,
        num_kv_blocks=args.blocks,
        block_size=16,
        kv_cache_memory="1GiB",
        seed=0,
    )
    kv = llm.engine.core.kv
    if not windowed:

        def from_the_head(keys: list[int]) -> tuple[list[int], int]:
            # The head walk, its hits behind the first query's window then given back at once.
            hashes = KVCacheManager._longest_hit(kv, iter(keys))
            return hashes, max(0, (len(hashes) * kv.block_size - kv.window + 1) // kv.block_size)

        kv._longest_windowed_hit = from_the_head  # type: ignore[method-assign]
    return llm


def run_once(llm: LLM, firsts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    llm.reset_prefix_cache()
    first_params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    answers = llm.generate(firsts, first_params, use_tqdm=False)
    vocab = SHAPE["vocab_size"]
    seconds = [
        first + list(answer.token_ids) + [(11 * i + 5 * j) % (vocab - 3) + 3 for j in range(args.new)]
        for i, (first, answer) in enumerate(zip(firsts, answers, strict=True))
    ]
    start = time.perf_counter()
    outputs = llm.generate(seconds, SamplingParams(max_tokens=args.answer, temperature=0.0, ignore_eos=True),
                           use_tqdm=False)  # fmt: skip
    wall = time.perf_counter() - start
    cached = sum(out.metrics.num_cached_tokens for out in outputs)
    return {
        "second_round_wall_s": wall,
        "cached_fraction": cached / sum(len(s) for s in seconds),
        "prompt_tokens_computed": sum(len(s) for s in seconds) - cached,
        "tokens": [out.token_ids for out in outputs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_arguments(parser)
    # All of the first turns' windows fit in the pool's 192 blocks (8 of about 17 each), as the
    # conversations a server keeps warm would; more, and the first second turns' own blocks evict
    # the later ones' windows before those are looked up, with either lookup.
    parser.set_defaults(requests=8)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--answer", type=int, default=16)
    args = parser.parse_args()
    folder, firsts = workload(args)
    engines = {"window": build(folder, args, windowed=True), "head": build(folder, args, windowed=False)}
    for llm in engines.values():
        llm.generate(firsts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    for round_number in range(args.repeats):
        for name, llm in engines.items():
            runs[name].append(run_once(llm, firsts, args))
            print(f"round {round_number + 1}/{args.repeats}: {name} done", file=sys.stderr)
    reference = runs["head"][0]["tokens"]
    figures = {}
    for name, results in runs.items():
        figures[name] = {
            key: statistics.median(r[key] for r in results)
            for key in ("second_round_wall_s", "cached_fraction", "prompt_tokens_computed")
        }
        figures[name]["same_tokens_as_head"] = results[0]["tokens"] == reference
    print(f"{'lookup':>8} {'2nd round s':>12} {'cached':>8} {'prompt tokens computed':>23}")
    for name, f in figures.items():
        print(f"{name:>8} {f['second_round_wall_s']:>12.2f} {f['cached_fraction']:>8.1%} "
              f"{f['prompt_tokens_computed']:>23.0f}  same tokens: {f['same_tokens_as_head']}")  # fmt: skip
    if args.out:
        long_prefill.write_figures(args, figures)


if __name__ == "__main__":
    main()
