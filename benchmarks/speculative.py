"""Speculative decoding by prompt lookup on the CPU: the built-in model with and without it.

Sixteen prompts (a speaker's name and the first words of a line, as the model was trained on):
up to 200 new tokens each, EOS ignored, run one request at a time (batch 1, where a step's cost is
mostly fixed and extra rows are nearly free) and all sixteen together; greedy and at temperature
0.8. One engine per ``num_speculative_tokens`` (0: off), all built first; each timed round runs
every engine once, in turn, so the machine's drift (runs minutes apart differed by up to a fifth
on a shared 2-vCPU VM) falls on all of them alike. It prints output tokens per second (median of
``--repeats`` rounds after one warm-up round), the share of proposed tokens the model accepted and
the tokens a request gained per step it ran proposals in. Greedy outputs are checked to be the
same tokens with and without speculation.

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


def _case(engines: dict[int, LLM], params: SamplingParams, batch: bool, repeats: int) -> list[dict]:
    """Every engine on one case, round by round; one row per engine."""
    times: dict[int, list[float]] = {guesses: [] for guesses in engines}
    counts = {guesses: (0, 0, 0) for guesses in engines}
    tokens: dict[int, list[list[int]]] = {}
    for round_number in range(repeats + 1):  # round 0 warms up
        for guesses, llm in engines.items():
            before = llm.engine.stats()
            seconds, tokens[guesses] = _run(llm, params, batch)
            after = llm.engine.stats()
            if round_number:
                times[guesses].append(seconds)
                drafts, drafted, accepted = counts[guesses]
                counts[guesses] = (
                    drafts + after.spec_drafts - before.spec_drafts,
                    drafted + after.spec_draft_tokens - before.spec_draft_tokens,
                    accepted + after.spec_accepted_tokens - before.spec_accepted_tokens,
                )
    if params.temperature == 0.0:
        assert all(t == tokens[0] for t in tokens.values()), "greedy outputs changed with speculation"
    rows = []
    for guesses, seconds in times.items():
        drafts, drafted, accepted = counts[guesses]
        total = sum(len(t) for t in tokens[guesses])
        rows.append(
            {
                "num_speculative_tokens": guesses,
                "temperature": params.temperature,
                "batch": len(PROMPTS) if batch else 1,
                "output_tokens": total,
                "output_tok_s": round(total / statistics.median(seconds), 1),
                "vs_off": round(statistics.median(times[0]) / statistics.median(seconds), 2),
                "run_seconds": [round(t, 3) for t in seconds],
                "acceptance": round(accepted / drafted, 3) if drafted else None,
                "tokens_per_proposal_step": round(1 + accepted / drafts, 2) if drafts else None,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    engines = {
        guesses: LLM(**({"speculative_config": {"num_speculative_tokens": guesses}} if guesses else {}))
        for guesses in GUESSES
    }
    results = []
    for temperature in (0.0, 0.8):
        params = SamplingParams(max_tokens=args.max_tokens, temperature=temperature, ignore_eos=True, seed=0)
        for batch in (False, True):
            for row in _case(engines, params, batch, args.repeats):
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
