"""Low-bit weights and an 8-bit KV cache on the CPU, on the built-in model: the projections'
memory, the KV blocks a budget holds, generation time and whether greedy tokens stay the same.

    python benchmarks/quantization.py

Variants, each an engine of its own, timed interleaved (median of 3): the float32 model,
``quantization="fp8"`` (projections made 8-bit floats at load), a W4A16 copy of the checkpoint
(4-bit integers, one scale per output channel, written by the tests' checkpoint writer and held as
int8) and ``kv_cache_dtype="fp8"``. Then embeddings (``LLM.embed``) of 64 prompts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from quantized_checkpoints import INT_LAYOUTS, _integer_config, make_int_checkpoint  # noqa: E402

from inferd import LLM, SamplingParams  # noqa: E402
from inferd.engine.builder import default_model_path  # noqa: E402

# The built-in model's MLP width (688) is no multiple of 32: 4-bit integers with one scale per channel.
INT_LAYOUTS["w4a16-channel"] = (
    _integer_config("pack-quantized", 4, "channel", None),
    4,
    "channel",
    True,
    False,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = default_model_path()
    with tempfile.TemporaryDirectory() as scratch:
        w4a16 = make_int_checkpoint(base, Path(scratch) / "w4a16", "w4a16-channel")
        variants = {
            "float32": (base, {}),
            "quantization=fp8": (base, {"quantization": "fp8"}),
            "W4A16 checkpoint": (w4a16, {}),
            "kv_cache_dtype=fp8": (base, {"kv_cache_dtype": "fp8"}),
        }
        engines = {
            name: LLM(folder, kv_cache_memory="64MiB", **options)
            for name, (folder, options) in variants.items()
        }
        prompts = [[(7 * i + j) % 200 + 5 for i in range(32)] for j in range(16)]
        params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        for llm in engines.values():
            llm.generate(prompts[:2], SamplingParams(max_tokens=4))  # first-call costs out of the timing
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, llm in engines.items():
                start = time.perf_counter()
                llm.generate(prompts, params)
                times[name].append(time.perf_counter() - start)
        check = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        reference = [out.token_ids for out in engines["float32"].generate(prompts[:4], check)]
        for name, llm in engines.items():
            model = llm.engine.core.runner.model
            projections = sum(
                p.numel() * p.element_size() for n, p in model.named_parameters() if "_proj." in n
            )
            tokens = [out.token_ids for out in llm.generate(prompts[:4], check)]
            pairs = zip(tokens, reference, strict=True)
            same = sum(a == b for ours, theirs in pairs for a, b in zip(ours, theirs, strict=True))
            median = statistics.median(times[name])
            print(f"{name}: projections {projections / 2**20:.2f} MiB, KV blocks in 64 MiB "
                  f"{llm.engine.config.cache.num_blocks}, 16 x 64 tokens {median:.3f} s "
                  f"({16 * 64 / median:.0f} tok/s; runs {', '.join(f'{t:.3f}' for t in times[name])}), "
                  f"greedy tokens equal to float32's {same}/64")  # fmt: skip
        texts = [[(11 * i + j) % 200 + 5 for i in range(32)] for j in range(64)]
        spent = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            engines["float32"].embed(texts)
            spent.append(time.perf_counter() - start)
        median = statistics.median(spent)
        print(f"embed 64 prompts x 32 tokens: {median:.3f} s ({64 / median:.0f} prompts/s; runs "
              f"{', '.join(f'{t:.3f}' for t in spent)})")  # fmt: skip


if __name__ == "__main__":
    main()
