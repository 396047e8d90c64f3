"""Speculative decoding on the CPU: the built-in model with and without it, by prompt lookup and,
with ``--draft-layers N``, by a draft model: the built-in model's first N layers, with its final
norm and head (an early exit; the only smaller model of its vocabulary there is).

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
    python benchmarks/speculative.py --draft-layers 1 --no-ngram   # the draft model's engines only
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from inferd import LLM, SamplingParams
from inferd.engine.builder import default_model_path

PROMPTS = [
    "ROMEO:\nWhat", "JULIET:\nO", "KING HENRY:\nThe king", "HAMLET:\nTo be, or not",
    "MENENIUS:\nWhy", "GLOUCESTER:\nNow", "DUKE VINCENTIO:\nI", "LADY CAPULET:\nWhat",
    "CORIOLANUS:\nHe", "PETRUCHIO:\nCome", "KING RICHARD III:\nSo", "QUEEN ELIZABETH:\nMy lord",
    "BRUTUS:\nWe", "ISABELLA:\nAnd", "LUCIO:\nBut", "First Citizen:\nWe are",
]  # fmt: skip
GUESSES = (0, 2, 4, 8)
DRAFT_GUESSES = (2, 4)


def first_layers(source: Path, folder: Path, layers: int) -> Path:
    """``source`` cut to its first ``layers`` layers, its final norm and head kept."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    kept = {name: t for name, t in tensors.items()
            if not name.startswith("model.layers.") or int(name.split(".")[2]) < layers}  # fmt: skip
    save_file(kept, folder / "model.safetensors")
    return folder


def _run(llm: LLM, params: SamplingParams, batch: bool) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    if batch:
        outputs = llm.generate(PROMPTS, params)
    else:
        outputs = [llm.generate([prompt], params)[0] for prompt in PROMPTS]
    return time.perf_counter() - start, [o.token_ids for o in outputs]


def _case(
    engines: dict[tuple[str, int], LLM], params: SamplingParams, batch: bool, repeats: int
) -> list[dict]:
    """Every engine (by proposer and guesses; ("off", 0) without speculation) on one case, round
    by round; one row per engine."""
    times: dict[tuple[str, int], list[float]] = {key: [] for key in engines}
    counts = {key: (0, 0, 0) for key in engines}
    tokens: dict[tuple[str, int], list[list[int]]] = {}
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
    off = ("off", 0)
    if params.temperature == 0.0:
        assert all(t == tokens[off] for t in tokens.values()), "greedy outputs changed with speculation"
    rows = []
    for (proposer, guesses), seconds in times.items():
        drafts, drafted, accepted = counts[proposer, guesses]
        total = sum(len(t) for t in tokens[proposer, guesses])
        rows.append(
            {
                "proposer": proposer,
                "num_speculative_tokens": guesses,
                "temperature": params.temperature,
                "batch": len(PROMPTS) if batch else 1,
                "output_tokens": total,
                "output_tok_s": round(total / statistics.median(seconds), 1),
                "vs_off": round(statistics.median(times[off]) / statistics.median(seconds), 2),
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
    parser.add_argument(
        "--draft-layers", type=int, default=0, help="add draft-model engines of so many layers"
    )
    parser.add_argument("--no-ngram", action="store_true", help="leave the prompt-lookup engines out")
    args = parser.parse_args()

    engines: dict[tuple[str, int], LLM] = {("off", 0): LLM()}
    if not args.no_ngram:
        for guesses in GUESSES[1:]:
            engines["ngram", guesses] = LLM(speculative_config={"num_speculative_tokens": guesses})
    scratch = tempfile.TemporaryDirectory()
    if args.draft_layers:
        draft = first_layers(default_model_path(), Path(scratch.name) / "draft", args.draft_layers)
        for guesses in DRAFT_GUESSES:
            engines[f"draft ({args.draft_layers} layers)", guesses] = LLM(
                speculative_config={"model": str(draft), "num_speculative_tokens": guesses}
            )
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
        "draft_layers": args.draft_layers,
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
