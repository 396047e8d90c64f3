"""Speculative decoding by prompt lookup on the CPU: the built-in model with and without it.

Sixteen prompts (a speaker's name and the first words of a line, as the model was trained on),
256-token contexts: up to 200 new tokens each, EOS ignored, run one request at a time (batch 1,
where a step's cost is mostly fixed and extra rows are nearly free) and all sixteen together.
Greedy and at temperature 0.8. For each ``num_speculative_tokens`` (0: off) it prints output tokens
per second (median of ``--repeats`` timed runs after one warm-up), the share of proposed tokens the
model accepted and the tokens a request gained per step it ran proposals in. Greedy outputs are
checked to be the same tokens with and without speculation.

    python benchmarks/speculative.py [--repeats 3] [--out benchmarks/results/speculative_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from inferd import LLM, SamplingParams

PROMPTS = [
    "ROMEO:\nWhat", "JULIET:\nO", "KING HENRY:\nThe king", "HAMLET:\nTo be, or not",
    "MENENIUS:\nWhy", "GLOUCESTER:\nNow", "DUKE VINCENTIO:\nI", "LADY CAPULET:\nWhat",
    "CORIOLANUS:\nHe", "PETRUCHIO:\nCome", "KING RICHARD III:\nSo", "QUEEN ELIZABETH:\nMy lord",
    "BRUTUS:\nWe", "ISABELLA:\nAnd", "LUCIO:\nBut", "First Citizen:\nWe are",
]  # fmt: skip
GUESSES = (0, 2, 4, 8)


def _run(llm: LLM, params: SamplingParams, batch: bool) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    if batch:
        outputs = llm.generate(PROMPTS, params)
    else:
        outputs = [llm.generate([prompt], params)[0] for prompt in PROMPTS]
    return time.perf_counter() - start, [o.token_ids for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    results = []
    greedy_tokens: dict[tuple[float, bool], list[list[int]]] = {}
    for guesses in GUESSES:
        options = {"speculative_config": {"num_speculative_tokens": guesses}} if guesses else {}
        llm = LLM(**options)
        for temperature in (0.0, 0.8):
            params = SamplingParams(max_tokens=args.max_tokens, temperature=temperature, ignore_eos=True, seed=0)
            for batch in (False, True):
                _run(llm, params, batch)  # warm-up
                before = llm.engine.stats()
                times, tokens = [], 0
                for _ in range(args.repeats):
                    seconds, outputs = _run(llm, params, batch)
                    times.append(seconds)
                    tokens = sum(len(t) for t in outputs)
                after = llm.engine.stats()
                if temperature == 0.0:
                    reference = greedy_tokens.setdefault((temperature, batch), outputs)
                    assert outputs == reference, "greedy outputs changed with speculation"
                drafts = after.spec_drafts - before.spec_drafts
                drafted = after.spec_draft_tokens - before.spec_draft_tokens
                accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
                row = {
                    "num_speculative_tokens": guesses,
                    "temperature": temperature,
                    "batch": len(PROMPTS) if batch else 1,
                    "output_tokens": tokens,
                    "output_tok_s": round(tokens / statistics.median(times), 1),
                    "run_seconds": [round(t, 3) for t in times],
                    "acceptance": round(accepted / drafted, 3) if drafted else None,
                    "tokens_per_proposal_step": round(1 + accepted / drafts, 2) if drafts else None,
                }
                results.append(row)
                print(json.dumps(row), flush=True)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
