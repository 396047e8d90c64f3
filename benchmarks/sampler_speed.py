"""Time the engine's sampler alone on random logits, optionally against its version at another
git revision, calls interleaved so both see the same machine load.

    python benchmarks/sampler_speed.py --rows 64 --vocab 151936 --temperature 0.6 --against 7bfb082

Prints the median and minimum milliseconds per call of each, and whether both drew the same
tokens from the same seed.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from inferd.engine.request import Request
from inferd.sample.sampler import Sampler
from inferd.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[1]


def sampler_at(revision: str) -> Any:
    """The ``Sampler`` class of ``sample/sampler.py`` as it was at ``revision``."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:src/inferd/sample/sampler.py"],
                            check=True, capture_output=True, text=True).stdout  # fmt: skip
    folder = Path(tempfile.mkdtemp())
    path = folder / "sampler_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("sampler_at_revision", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module.Sampler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--against", help="a git revision whose sampler runs alongside this one")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.vocab)
    params = SamplingParams(max_tokens=8, temperature=args.temperature, ignore_eos=True)
    requests = [Request(str(i), [1], params, frozenset(), 8) for i in range(args.rows)]
    classes = {"now": Sampler}
    if args.against:
        classes[args.against] = sampler_at(args.against)
    samplers = {name: cls(0) for name, cls in classes.items()}
    for sampler in samplers.values():
        sampler(logits, requests)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(args.calls):
        for name, sampler in samplers.items():
            start = time.perf_counter()
            sampler(logits, requests)
            times[name].append(time.perf_counter() - start)
    for name, measured in times.items():
        median, fastest = statistics.median(measured) * 1e3, min(measured) * 1e3
        print(f"{name}: {args.rows} rows x {args.vocab}, T={args.temperature}: "
              f"median {median:.1f} ms, min {fastest:.1f} ms")  # fmt: skip
    if len(classes) > 1:
        drawn = [cls(7)(logits, requests).token_ids for cls in classes.values()]
        print("same tokens from the same seed:", all(d == drawn[0] for d in drawn))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
