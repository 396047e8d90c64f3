"""`inferd bench offline`: the engine in this process through the offline `LLM` API, no HTTP."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from inferd.bench.client import RequestRecord
from inferd.bench.datasets import BenchRequest, clip_to_context, nanovllm_requests
from inferd.bench.runner import RunResult
from inferd.entrypoints.engine_args import engine_options
from inferd.sampling_params import SamplingParams

if TYPE_CHECKING:
    from inferd.engine.outputs import RequestOutput
    from inferd.llm import LLM


def workload_for(llm: LLM, args: argparse.Namespace) -> tuple[list[BenchRequest], bool]:
    """The requests as token ids that fit the model's context; the flag says whether any were clipped."""
    config = llm.engine.config
    vocab_size, max_model_len = config.model.vocab_size, config.scheduler.max_model_len
    if args.preset == "nanovllm":
        return nanovllm_requests(vocab_size, max_model_len)
    from inferd.bench.cli import build_requests

    # Random prompts stay token ids (exact lengths, no decode and re-encode); others need the tokenizer.
    tokenizer = None if args.dataset[0] == "random" else llm.tokenizer
    workload = build_requests(args, tokenizer, token_id_limit=min(args.token_id_limit, vocab_size))
    requests = [_as_token_ids(llm, request) for request in workload]
    return clip_to_context(requests, max_model_len)


def _as_token_ids(llm: LLM, request: BenchRequest) -> BenchRequest:
    if isinstance(request.prompt, list):
        return request
    token_ids = llm.tokenizer.encode(request.prompt)
    return BenchRequest(prompt=token_ids, max_tokens=request.max_tokens, input_len=len(token_ids))


# nano-vllm's bench.py samples its workload at this temperature.
NANOVLLM_TEMPERATURE = 0.6


def temperature_for(args: argparse.Namespace) -> float:
    """`--temperature`, else the preset's (nano-vllm's 0.6, so the sampler runs as in its bench), else 0."""
    if args.temperature is not None:
        return float(args.temperature)
    return NANOVLLM_TEMPERATURE if args.preset == "nanovllm" else 0.0


def generate_timed(
    llm: LLM, requests: list[BenchRequest], show_progress: bool, temperature: float = 0.0
) -> RunResult:
    """One `generate` call over the whole workload (EOS ignored so every output is full length)."""
    params = [
        SamplingParams(max_tokens=r.max_tokens, ignore_eos=True, temperature=temperature) for r in requests
    ]
    prompts = [request.prompt for request in requests]
    run_start_monotonic, run_start = time.monotonic(), time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=show_progress, raise_on_error=False)  # type: ignore[arg-type]
    duration_s = time.perf_counter() - run_start
    records = [_record(index, output, run_start_monotonic) for index, output in enumerate(outputs)]
    return RunResult(records=records, duration_s=duration_s)


def _record(index: int, output: RequestOutput, run_start_monotonic: float) -> RequestRecord:
    """The engine's own timings (arrival to first token, to finish); no per-token times, so no ITL."""
    metrics = output.metrics
    return RequestRecord(
        index=index,
        start_s=metrics.arrival_time - run_start_monotonic,
        max_tokens=len(output.token_ids),
        ttft_s=metrics.ttft_s,
        e2e_s=metrics.e2e_s,
        prompt_tokens=output.num_prompt_tokens,
        output_tokens=len(output.token_ids),
        tokens_from_usage=True,
        error="engine" if output.error else None,
        error_detail=output.error,
    )


def run_offline_bench(args: argparse.Namespace) -> int:
    from inferd.bench.cli import plain_config
    from inferd.bench.report import format_table, summarize, write_json
    from inferd.llm import LLM

    with LLM(args.model, **engine_options(args)) as llm:  # a tensor-parallel engine's ranks go with it
        requests, clipped = workload_for(llm, args)
        if clipped:
            context = llm.engine.config.scheduler.max_model_len
            print(f"note: lengths clipped to fit the model's context of {context}")
        # Warm-up outside the timed run (first-call allocations, kernel selection); ids unlike the
        # workload's so the prefix cache gives the timed run nothing.
        llm.generate([[0, 1, 2, 3]], SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0))
        temperature = temperature_for(args)
        result = generate_timed(llm, requests, not args.no_progress, temperature)
        summary = summarize(result.records, result.duration_s)
        print(format_table(summary, title=f"inferd bench offline (temperature {temperature:g})"))
        config: dict[str, Any] = {
            **plain_config(args),
            "temperature": temperature,
            "title": f"offline {llm.engine.config.model_path.name}",
        }
        prefix = args.output_prefix  # made ready by the CLI
        write_json(f"{prefix}.json", config, summary, result.records)
        print(f"wrote {prefix}.json")
    return 0 if summary["completed"] else 1
