"""What scoring an echoed prompt costs with n > 1: `/v1/completions` with `echo`, `logprobs` and `n`,
or (``--tgi``) TGI's `/generate` with `decoder_input_details` and `best_of`.

A server of the built-in model, its context raised to ``--context`` tokens, answers one request at a
time: a prompt of ``--prompt-tokens`` random token ids, ``echo: true``, ``logprobs: 1``,
``max_tokens: 1``, for each n of ``--n``; the prefix cache is reset before each, so every request
computes its prompt. With ``--tgi`` the prompt is those ids' text, each n a `best_of` (1: none), and
the server's ``--max-best-of`` the largest n. The figures are the median seconds per request over
``--repeats``.

    python benchmarks/echo_scoring.py --n 1 4 8
    python benchmarks/echo_scoring.py --tgi --n 1 2 4

Run it with another tree's ``src`` first on ``PYTHONPATH`` to time that tree's server.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import httpx
from prepare_stall import serving_long_context_model

import inferd


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--context", type=int, default=4096, help="the model's context, in tokens")
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tgi", action="store_true", help="TGI's /generate with best_of instead")
    args = parser.parse_args()
    random.seed(0)
    prompt = [random.randrange(1, 4096) for _ in range(args.prompt_tokens)]
    print(f"inferd from {Path(inferd.__file__).parent}")
    if args.tgi:
        time_tgi(args, prompt)
        return
    with serving_long_context_model(args.context) as url:
        body = {"prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 1.0}
        httpx.post(f"{url}/v1/completions", json=body, timeout=600).raise_for_status()  # warm-up
        for n in args.n:
            times = []
            for _ in range(args.repeats):
                httpx.post(f"{url}/reset_prefix_cache", timeout=60).raise_for_status()
                start = time.perf_counter()
                answer = httpx.post(f"{url}/v1/completions", json={**body, "n": n}, timeout=600)
                times.append(time.perf_counter() - start)
                answer.raise_for_status()
                choices = answer.json()["choices"]
                assert len(choices) == n
                scored = [len(choice["logprobs"]["token_logprobs"]) for choice in choices]
                assert scored == [args.prompt_tokens + 1] * n
            print(f"n={n}: median {statistics.median(times):.3f} s "
                  f"(runs {', '.join(f'{t:.3f}' for t in times)})", flush=True)  # fmt: skip


def time_tgi(args: argparse.Namespace, prompt: list[int]) -> None:
    with serving_long_context_model(args.context, "--max-best-of", str(max(args.n))) as url:
        text = httpx.post(f"{url}/detokenize", json={"tokens": prompt}, timeout=60).json()["prompt"]
        parameters = {"max_new_tokens": 1, "details": True, "decoder_input_details": True, "do_sample": True}
        body = {"inputs": text, "parameters": parameters}
        httpx.post(f"{url}/generate", json=body, timeout=600).raise_for_status()  # warm-up
        for n in args.n:
            asked = {**body, "parameters": {**parameters, **({"best_of": n} if n > 1 else {})}}
            times = []
            for _ in range(args.repeats):
                httpx.post(f"{url}/reset_prefix_cache", timeout=60).raise_for_status()
                start = time.perf_counter()
                answer = httpx.post(f"{url}/generate", json=asked, timeout=600)
                times.append(time.perf_counter() - start)
                answer.raise_for_status()
                details = answer.json()["details"]
                others = details.get("best_of_sequences") or []
                assert len(others) == n - 1
                assert all(len(d["prefill"]) == details["input_length"] for d in [details, *others])
            print(f"best_of={n}: median {statistics.median(times):.3f} s, {details['input_length']} prompt "
                  f"tokens (runs {', '.join(f'{t:.3f}' for t in times)})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
