"""Host time of one step's prompt-lookup guesses at long histories: the proposer's own kept
history (each step adds the new tokens) against an array made afresh from the whole history, as
before (``NgramProposer.propose`` on ``prompt + output``, what every step used to do).

    python benchmarks/ngram_history.py [--requests 256] [--tokens 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from inferd.config import SpeculativeConfig
from inferd.sched.ngram_proposer import NgramProposer
from inferd.sched.proposer import GuessRequest


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2000, help="each request's history, prompt included")
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 1000, 128).tolist() for _ in range(args.requests)]
    outputs = [rng.integers(0, 1000, args.tokens - 128).tolist() for _ in range(args.requests)]
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=4))

    def afresh() -> None:
        for prompt, output in zip(prompts, outputs, strict=True):
            proposer.propose(prompt + output, 4)

    def kept() -> None:
        asked = [
            GuessRequest(f"r{i}", p, o, 4) for i, (p, o) in enumerate(zip(prompts, outputs, strict=True))
        ]
        proposer.propose_batch(asked)

    kept()  # the first step makes each history once
    for name, step in (("afresh", afresh), ("kept", kept)):
        times = []
        for _ in range(args.steps):
            for output in outputs:  # a new token each, as a decode step gives
                output.append(int(rng.integers(0, 1000)))
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        print(f"{name}: {statistics.median(times) * 1e3:.2f} ms a step (median of {args.steps})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
