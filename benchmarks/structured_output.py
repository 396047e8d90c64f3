"""What structured outputs cost: the same batch generated plain and under constraints, on the
built-in model (or a folder given), with the time spent making and applying the masks.

    python benchmarks/structured_output.py --requests 64 --max-tokens 64

Prints, per case, the output tokens, seconds, output tokens per second and the milliseconds per
step spent in the sampler's mask pass (`_apply_grammars`: the host's masks, one copy, one pass).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from inferd import LLM, SamplingParams
from inferd.sample import sampler as sampler_module
from inferd.structured.spec import StructuredOutput

# A schema a small model fills slowly: free text in strings, so the requests run to their budget.
SCHEMA = {
    "type": "object",
    "properties": {"speaker": {"type": "string"}, "line": {"type": "string"}, "act": {"type": "integer"}},
    "required": ["speaker", "line", "act"],
}
CASES: dict[str, StructuredOutput | None] = {
    "plain": None,
    "regex [A-Za-z ,.;:!?'\\n]+": StructuredOutput(regex=r"[A-Za-z ,.;:!?'\n]+"),
    "json schema": StructuredOutput(json=json.dumps(SCHEMA)),
}


class MaskTimer:
    """Wraps the sampler's mask pass to add up the host time it takes."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._inner = sampler_module._apply_grammars

    def __call__(self, *args: Any) -> None:
        start = time.perf_counter()
        self._inner(*args)
        self.seconds += time.perf_counter() - start
        self.calls += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a Hugging Face folder (default: the built-in model)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    llm = LLM(args.model) if args.model else LLM()
    prompts = [f"ROMEO {i}:" for i in range(args.requests)]
    llm.generate(prompts[:4], SamplingParams(max_tokens=8))  # warm-up
    print(f"{'case':32} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'mask ms/step':>13}")
    for name, spec in CASES.items():
        params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=0, structured_output=spec)
        timer = MaskTimer()
        sampler_module._apply_grammars = timer  # type: ignore[assignment]
        try:
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            seconds = time.perf_counter() - start
        finally:
            sampler_module._apply_grammars = timer._inner  # type: ignore[assignment]
        tokens = sum(len(out.token_ids) for out in outs)
        mask_ms = 1000 * timer.seconds / timer.calls if timer.calls else 0.0
        print(f"{name:32} {tokens:7d} {seconds:8.2f} {tokens / seconds:8.1f} {mask_ms:13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
