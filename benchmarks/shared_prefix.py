"""Prompts that share a long head, arriving together: what the engine computes and how long it takes.

A random-weight model in the shape of SmolLM-135M (as `offline_throughput.py` builds it), float32 on
the CPU; ``--prompts`` prompts of one head of ``--head`` random token ids followed by a tail of
``--tail`` of their own, all given to one `LLM.generate` call with ``--output`` greedy tokens each
(EOS ignored), on a cold prefix cache, with a step budget of ``--max-num-batched-tokens``. It
prints the wall time, the prompt tokens the engine computed, the prefix cache's hits and the
admissions put off for a head in flight, for ``--rounds`` rounds (a fresh cache each).

    python benchmarks/shared_prefix.py --prompts 32 --head 1024 --tail 32 --output 16
    python benchmarks/shared_prefix.py --max-num-batched-tokens 8192 --output 4

With ``--schedule-cost N`` it times the scheduler alone instead (no model): N requests of one
2,048-token head and 8 tokens of their own wait (block size 16, step budget 2,048, long-prefill
threshold 512, 256 sequences at most), and it prints the milliseconds of each of the first steps'
``schedule()`` while the first request computes the head.

    python benchmarks/shared_prefix.py --schedule-cost 1000

Run it with another tree's ``src`` first on ``PYTHONPATH`` to time that tree's engine.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from offline_throughput import build_model

import inferd
from inferd import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--head", type=int, default=1024)
    parser.add_argument("--tail", type=int, default=32)
    parser.add_argument("--output", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="the step's token budget")
    parser.add_argument("--schedule-cost", type=int, default=0, metavar="N", help="time the scheduler alone")
    args = parser.parse_args()
    if args.schedule_cost:
        schedule_cost(args.schedule_cost)
        return
    random.seed(0)
    head = [random.randrange(1, 10000) for _ in range(args.head)]
    prompts = [head + [random.randrange(1, 10000) for _ in range(args.tail)] for _ in range(args.prompts)]
    params = SamplingParams(max_tokens=args.output, temperature=0.0, ignore_eos=True)
    print(f"inferd from {Path(inferd.__file__).parent}")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        build_model(folder)
        llm = LLM(folder, kv_cache_memory="4GiB", max_num_batched_tokens=args.max_num_batched_tokens)
        llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4))  # warm-up
        for round_index in range(args.rounds):
            llm.reset_prefix_cache()
            before = llm.engine.stats()
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            seconds = time.perf_counter() - start
            after = llm.engine.stats()
            assert all(len(out.token_ids) == args.output for out in outs)
            waits = getattr(after, "prefix_waits", 0) - getattr(before, "prefix_waits", 0)
            print(
                f"round {round_index + 1}: {seconds:.2f} s, prompt tokens computed "
                f"{after.prompt_tokens_computed - before.prompt_tokens_computed}, prefix hits "
                f"{after.prefix_hits - before.prefix_hits}, admissions put off {waits}",
                flush=True,
            )


def schedule_cost(num_waiting: int) -> None:
    from inferd.config import SchedulerConfig
    from inferd.engine.request import Request
    from inferd.kv.manager import KVCacheManager
    from inferd.sched.scheduler import Scheduler

    config = SchedulerConfig(
        max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=4096, long_prefill_token_threshold=512
    )
    scheduler = Scheduler(config, KVCacheManager(4096, 16))
    head = list(range(2048))
    for i in range(num_waiting):
        scheduler.add(
            Request(f"r{i}", head + [10000 + i] * 8, SamplingParams(max_tokens=4), frozenset({99999}), 4)
        )
    for step in range(5):
        start = time.perf_counter()
        out = scheduler.schedule()
        print(f"step {step + 1}: schedule() {1e3 * (time.perf_counter() - start):.2f} ms", flush=True)
        scheduler.update(out, {seq.request.request_id: [7] for seq in out.sequences if seq.sample})


if __name__ == "__main__":
    main()
