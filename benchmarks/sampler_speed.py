"""Time the engine's sampler alone on random logits, optionally against its version at another
git revision, calls interleaved so both see the same machine load.

    python benchmarks/sampler_speed.py --rows 64 --vocab 151936 --temperature 0.6 --against 7bfb082
    python benchmarks/sampler_speed.py --repetition-penalty 1.05 --prompt-tokens 500 --output-tokens 100

Each row's request has a random prompt and output of the given lengths, and each call appends the
token it drew to the output (what the penalties read). Prints the median and minimum milliseconds
per call of each, and whether both drew the same tokens from the same seed.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
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


def _module_at(revision: str, path: str, name: str) -> Any:
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:{path}"],
                            check=True, capture_output=True, text=True).stdout  # fmt: skip
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _exists_at(revision: str, path: str) -> bool:
    command = ["git", "-C", str(REPO), "cat-file", "-e", f"{revision}:{path}"]
    return subprocess.run(command, capture_output=True).returncode == 0


def sampler_at(revision: str) -> Any:
    """The ``Sampler`` class of ``sample/sampler.py`` as it was at ``revision``, with the logits
    processors of ``sample/penalty_state.py`` (where it existed) and ``sample/penalties.py`` as
    they were then."""
    live = {name: sys.modules[name] for name in ("inferd.sample.penalty_state", "inferd.sample.penalties")}
    try:
        for name in live:  # penalties.py may import penalty_state.py: the old one, loaded first
            path = f"src/inferd/{name.removeprefix('inferd.').replace('.', '/')}.py"
            if _exists_at(revision, path):
                sys.modules[name] = _module_at(revision, path, f"{name.rsplit('.', 1)[1]}_at_revision")
        return _module_at(revision, "src/inferd/sample/sampler.py", "sampler_at_revision").Sampler
    finally:
        sys.modules.update(live)


def _requests(args: argparse.Namespace, params: SamplingParams) -> list[Request]:
    rng = random.Random(0)
    requests = []
    for i in range(args.rows):
        prompt = [rng.randrange(args.vocab) for _ in range(max(1, args.prompt_tokens))]
        request = Request(str(i), prompt, params, frozenset(), args.output_tokens + args.calls + 8)
        request.output_token_ids = [rng.randrange(args.vocab) for _ in range(args.output_tokens)]
        requests.append(request)
    return requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--against", help="a git revision whose sampler runs alongside this one")
    parser.add_argument("--prompt-tokens", type=int, default=1)
    parser.add_argument("--output-tokens", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--penalty-tables", action="store_true",
                        help="this sampler keeps the penalties' counts in tables on the logits' device, "
                        "as on a GPU, rather than on the host")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.vocab)
    params = SamplingParams(
        temperature=args.temperature,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        ignore_eos=True,
    )
    classes = {"now": Sampler}
    if args.against:
        classes[args.against] = sampler_at(args.against)
    samplers = {name: cls(0) for name, cls in classes.items()}
    if args.penalty_tables:
        samplers["now"] = Sampler(0, penalty_tables=True)
    requests = {name: _requests(args, params) for name in samplers}  # each grows its own outputs

    def call(name: str) -> list[int]:
        drawn = samplers[name](logits, requests[name]).token_ids
        for request, token in zip(requests[name], drawn, strict=True):
            request.output_token_ids.append(token)
        return drawn

    for name in samplers:
        call(name)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(args.calls):
        for name in samplers:
            start = time.perf_counter()
            call(name)
            times[name].append(time.perf_counter() - start)
    for name, measured in times.items():
        median, fastest = statistics.median(measured) * 1e3, min(measured) * 1e3
        print(f"{name}: {args.rows} rows x {args.vocab}, T={args.temperature}: "
              f"median {median:.1f} ms, min {fastest:.1f} ms")  # fmt: skip
    if len(classes) > 1:
        drawn = [cls(7)(logits, _requests(args, params)).token_ids for cls in classes.values()]
        print("same tokens from the same seed:", all(d == drawn[0] for d in drawn))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
