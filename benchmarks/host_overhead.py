"""Host time per engine step, phase by phase: the work that sits between two steps on a GPU
unless asynchronous scheduling overlaps it with the device's.

A toy model of the Qwen3 structure (random weights, 2 layers, width 64) keeps the forward pass
short, so the Python around it stands out. Every sequence decodes with EOS ignored; the first
steps (prefill and warm-up) are left out of the figures.

    python benchmarks/host_overhead.py                      # CPU, 1 and 256 sequences
    python benchmarks/host_overhead.py --seqs 64 --device cuda
    python benchmarks/host_overhead.py --seqs 256 --new-tokens 1000 --stream [--freeze]

``--stream`` reads an output every step, as a server does (else only the last, as the offline
API does); ``gc`` is the time the cyclic garbage collector's passes took, ``gc_max`` the longest
pass, and ``--freeze`` freezes the start-up objects first, as the server does
(``engine/gc_heap.py``).
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import gpu  # noqa: E402  (the model shapes and the tokenizer-only model folder)

from inferd import LLM, SamplingParams  # noqa: E402
from inferd.engine.gc_heap import freeze_start_up_heap  # noqa: E402
from inferd.worker import model_runner  # noqa: E402

WARMUP_STEPS = 5


def timed(totals: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    return wrapper


def measure(
    folder: Path, num_seqs: int, new_tokens: int, options: dict[str, Any], stream: bool, freeze: bool
) -> dict[str, float]:
    max_model_len = max(256, 16 + new_tokens)
    llm = LLM(
        folder, load_format="dummy", max_num_seqs=max(num_seqs, 1), max_model_len=max_model_len, **options
    )
    engine = llm.engine
    core, runner = engine.core, engine.core.runner
    totals: dict[str, float] = defaultdict(float)
    core.scheduler.schedule = timed(totals, "schedule", core.scheduler.schedule)  # type: ignore[method-assign]
    core.scheduler.update = timed(totals, "update", core.scheduler.update)  # type: ignore[method-assign]
    runner.model.forward = timed(totals, "forward", runner.model.forward)  # type: ignore[method-assign]
    runner.model.compute_logits = timed(totals, "logits", runner.model.compute_logits)  # type: ignore[method-assign]
    runner.sampler.sample = timed(totals, "sample", runner.sampler.sample)  # type: ignore[method-assign]
    engine.output_processor.process = timed(totals, "outputs", engine.output_processor.process)  # type: ignore[method-assign]
    build = model_runner.build_inputs
    model_runner.build_inputs = timed(totals, "build_inputs", build)  # type: ignore[assignment]
    passes: list[float] = []
    began = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            passes.append(time.perf_counter() - began[0])

    if freeze:
        freeze_start_up_heap()
    gc.callbacks.append(on_gc)
    try:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        vocab = engine.config.model.vocab_size
        for i in range(num_seqs):
            prompt = [(7 * i + j) % vocab for j in range(16)]
            engine.add_request(f"r{i}", prompt, params, final_only=not stream)
        steps, start = 0, 0.0
        while engine.has_unfinished():
            engine.step()
            steps += 1
            if steps == WARMUP_STEPS:
                totals.clear()
                passes.clear()
                start = time.perf_counter()
        measured = steps - WARMUP_STEPS
        wall = time.perf_counter() - start
    finally:
        gc.callbacks.remove(on_gc)
        if freeze:
            gc.unfreeze()
        model_runner.build_inputs = build  # type: ignore[assignment]
    totals["gc"] = sum(passes)
    per_step = {name: seconds / measured * 1e3 for name, seconds in totals.items()}
    per_step["gc_max"] = max(passes, default=0.0) * 1e3
    per_step["step"] = wall / measured * 1e3
    per_step["host_outside_forward"] = per_step["step"] - per_step.get("forward", 0.0)
    return per_step


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seqs", type=int, nargs="+", default=[1, 256], help="batch sizes to time")
    parser.add_argument("--new-tokens", type=int, default=120, help="tokens decoded per sequence")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--stream", action="store_true", help="read an output every step, as a server")
    parser.add_argument("--freeze", action="store_true", help="freeze the start-up objects, as a server")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options: dict[str, Any] = {"device": args.device, "dtype": "float32"}
    with tempfile.TemporaryDirectory() as tmp:
        shape = gpu.shape_config(gpu.QWEN3_0_6B, smoke=True)
        # Room for long outputs, where per-step costs that grow with the output show.
        shape["max_position_embeddings"] = max(shape["max_position_embeddings"], 16 + args.new_tokens)
        folder = gpu.write_model_folder(Path(tmp), shape)
        print("ms per step | " + " | ".join(PHASES))
        for num_seqs in args.seqs:
            figures = measure(folder, num_seqs, args.new_tokens, options, args.stream, args.freeze)
            cells = " | ".join(f"{figures.get(name, 0.0):.3f}" for name in PHASES)
            print(f"{num_seqs} seqs | {cells}", flush=True)
    return 0


PHASES = ("schedule", "build_inputs", "forward", "logits", "sample", "update", "outputs", "gc", "gc_max",
          "step", "host_outside_forward")  # fmt: skip

if __name__ == "__main__":
    raise SystemExit(main())
