"""`inferd bench serve|offline|compare`: arguments in, workload built, results reported."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferd.bench.datasets import BenchRequest, LengthRange, TextTokenizer, refused_json_constant
from inferd.entrypoints.engine_args import (
    add_engine_args,
    add_model_argument,
    non_negative_float,
    non_negative_int,
    positive_int,
)

if TYPE_CHECKING:
    from inferd.bench.runner import RunResult

_DATASET_KINDS = ("random", "sharegpt", "jsonl")


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench", help="Benchmark a server (any OpenAI-compatible one) or the engine."
    )
    modes = bench.add_subparsers(dest="bench_command", required=True)
    _add_serve_parser(modes)
    _add_offline_parser(modes)
    _add_compare_parser(modes)


def _add_workload_args(parser: argparse.ArgumentParser, tokenizer_option: bool) -> None:
    workload = parser.add_argument_group("workload")
    workload.add_argument(
        "--dataset",
        nargs="+",
        default=["random"],
        metavar=("KIND", "PATH"),
        help="random | sharegpt PATH (ShareGPT JSON) | jsonl PATH (lines of {prompt, max_tokens})",
    )
    workload.add_argument("--num-prompts", type=positive_int, default=100)
    workload.add_argument("--seed", type=int, default=0)
    workload.add_argument(
        "--input-len",
        type=_length_range,
        default=LengthRange(1024, 1024),
        metavar="N|LOW:HIGH",
        help="random prompts: length in tokens, uniform over the range (default 1024)",
    )
    workload.add_argument(
        "--output-len",
        type=_length_range,
        default=None,
        metavar="N|LOW:HIGH",
        help="max_tokens, uniform over the range (random default 128; sharegpt default: the reply's length)",
    )
    workload.add_argument(
        "--random-prefix-len",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="random prompts all start with the same N random tokens (a shared prefix), then their own "
        "--input-len ones (default 0)",
    )
    workload.add_argument(
        "--token-id-limit",
        type=positive_int,
        default=10000,
        help="random prompts draw token ids below this (default 10000)",
    )
    if tokenizer_option:
        workload.add_argument(
            "--tokenizer",
            default=None,
            help="tokenizer.json or a model folder; default: the model if it is a local folder",
        )


def _add_report_args(parser: argparse.ArgumentParser, kind: str, plot: bool) -> None:
    report = parser.add_argument_group("report")
    files = "PREFIX.json (every request) and PREFIX.png" if plot else "PREFIX.json (every request)"
    report.add_argument("--output-prefix", default=None, help=f"write {files}; default bench-{kind}-<time>")
    if plot:
        report.add_argument("--no-plot", action="store_true", help="skip the PNG")
    report.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_serve_parser(modes: argparse._SubParsersAction) -> None:
    parser = modes.add_parser(
        "serve", help="Load-test an OpenAI-compatible HTTP server with streamed requests."
    )
    parser.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="server root (a trailing /v1 is fine)"
    )
    parser.add_argument("--model", default=None, help="model name to request; default: first of /v1/models")
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    parser.add_argument(
        "--request-rate",
        type=_positive_number,
        default=math.inf,
        help="requests/s, Poisson arrivals; inf (default) sends all at once",
    )
    parser.add_argument(
        "--burstiness",
        type=_positive_number,
        default=1.0,
        help="gaps between arrivals drawn from a gamma distribution of this shape: 1 Poisson (default), "
        "below 1 bursts, above 1 more even",
    )
    parser.add_argument(
        "--max-concurrency", type=positive_int, default=None, help="cap on requests in flight"
    )
    parser.add_argument("--ignore-eos", action="store_true", help="ask the server to generate all max_tokens")
    parser.add_argument(
        "--extra-body",
        type=_json_object,
        default=None,
        metavar="JSON",
        help='fields added to every request body, e.g. \'{"response_format": {"type": "json_object"}}\' '
        "to load-test structured outputs, or a temperature (model, prompt, max_tokens and the stream "
        "fields stay the bench's)",
    )
    parser.add_argument(
        "--slo-ttft-ms", type=_positive_number, default=None, help="goodput: TTFT bound in ms"
    )
    parser.add_argument(
        "--slo-tpot-ms", type=_positive_number, default=None, help="goodput: TPOT bound in ms"
    )
    parser.add_argument(
        "--timeout-s",
        type=_positive_number,
        default=600.0,
        help="a request not answered in full within this many seconds is a timeout error",
    )
    parser.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY"
    )
    _add_workload_args(parser, tokenizer_option=True)
    _add_report_args(parser, "serve", plot=True)
    parser.set_defaults(func=run_serve)


def _positive_number(text: str) -> float:
    """A float above 0 (`inf` included); NaN, zero and below are usage errors."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _length_range(text: str) -> LengthRange:
    try:
        return LengthRange.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not N or LOW:HIGH with 1 <= LOW <= HIGH ({exc})"
        ) from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        # NaN and Infinity, which Python's reader takes, no request body can carry: the run's
        # first send failed on them.
        value = json.loads(text, parse_constant=refused_json_constant)
    except (ValueError, RecursionError):  # an integer past 4,300 digits is a plain ValueError
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _add_offline_parser(modes: argparse._SubParsersAction) -> None:
    parser = modes.add_parser("offline", help="Benchmark the engine in this process, without HTTP.")
    add_model_argument(parser)
    parser.add_argument(
        "--preset",
        choices=("nanovllm",),
        default=None,
        help="nanovllm: 256 prompts, input and output lengths uniform in [100, 1024], seed 0",
    )
    parser.add_argument(
        "--temperature",
        type=non_negative_float,
        default=None,
        help="sampling temperature; default 0.6 with --preset nanovllm (its bench.py's), else 0 (greedy)",
    )
    # --seed belongs to the workload here.
    add_engine_args(parser, seed_flag=False)
    # Offline prompts go through the engine's own tokenizer.
    _add_workload_args(parser, tokenizer_option=False)
    _add_report_args(parser, "offline", plot=False)
    parser.set_defaults(func=run_offline)


def _add_compare_parser(modes: argparse._SubParsersAction) -> None:
    parser = modes.add_parser("compare", help="Side-by-side table of two bench JSON reports, with ratios.")
    parser.add_argument("a", type=Path, help="baseline JSON (A)")
    parser.add_argument("b", type=Path, help="candidate JSON (B)")
    parser.set_defaults(func=run_compare)


def build_requests(
    args: argparse.Namespace, tokenizer: TextTokenizer | None, token_id_limit: int
) -> list[BenchRequest]:
    """The workload the dataset arguments describe; random token ids stay below `token_id_limit`."""
    from inferd.bench import datasets

    kind, *paths = args.dataset
    if kind not in _DATASET_KINDS or len(paths) != (kind != "random"):
        raise ValueError(
            f"--dataset takes 'random', 'sharegpt PATH' or 'jsonl PATH', got {' '.join(args.dataset)}"
        )
    if kind == "random":
        return datasets.random_requests(
            args.num_prompts,
            args.input_len,
            args.output_len or LengthRange(128, 128),
            args.seed,
            token_id_limit,
            tokenizer,
            args.random_prefix_len,
        )
    if args.random_prefix_len:
        raise ValueError("--random-prefix-len is for --dataset random")
    if kind == "sharegpt":
        if args.output_len is not None and args.output_len.low != args.output_len.high:
            raise ValueError("sharegpt takes a fixed --output-len N, not a range")
        fixed = args.output_len.low if args.output_len else None
        return datasets.sharegpt_requests(paths[0], args.num_prompts, args.seed, tokenizer, fixed)
    return datasets.jsonl_requests(paths[0], args.num_prompts)


def _tokenizer_for(args: argparse.Namespace, model: str | None) -> TextTokenizer | None:
    from inferd.bench.datasets import load_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    if model and (Path(model) / "tokenizer.json").is_file():
        return load_tokenizer(model)
    return None


def _write_outputs(
    args: argparse.Namespace, config: dict[str, Any], summary: dict[str, Any], result: RunResult
) -> None:
    from inferd.bench.report import write_json

    prefix = args.output_prefix
    write_json(f"{prefix}.json", config, summary, result.records)
    written = [f"{prefix}.json"]
    if not args.no_plot:
        from inferd.bench.plot import write_png

        write_png(f"{prefix}.png", result.records, result.duration_s, title=config["title"])
        written.append(f"{prefix}.png")
    print("wrote " + ", ".join(written))


def _resolve_output_prefix(args: argparse.Namespace) -> None:
    """``--output-prefix`` (or a dated default), its folder made before the run: one that cannot be
    is a usage error then, not a run lost at its end."""
    prefix = args.output_prefix or f"bench-{args.bench_command}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = Path(prefix).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--output-prefix: cannot make the folder {str(folder)!r}: {exc}") from None
    args.output_prefix = prefix


def run_serve(args: argparse.Namespace) -> int:
    from inferd.bench.client import OpenAIStreamClient, first_served_model
    from inferd.bench.report import Slo, format_table, summarize
    from inferd.bench.runner import run_requests

    _resolve_output_prefix(args)
    model = args.model or first_served_model(args.base_url, args.api_key)
    requests = build_requests(args, _tokenizer_for(args, model), args.token_id_limit)
    if args.endpoint == "chat" and not all(isinstance(request.prompt, str) for request in requests):
        raise ValueError("the chat endpoint needs text prompts: give --tokenizer (or a local --model folder)")
    client = OpenAIStreamClient(
        args.base_url, model, args.endpoint, args.ignore_eos, args.timeout_s, args.api_key, args.extra_body
    )

    async def drive() -> RunResult:
        try:
            return await run_requests(
                client.send,
                requests,
                args.request_rate,
                args.max_concurrency,
                args.seed,
                not args.no_progress,
                args.burstiness,
            )
        finally:
            await client.aclose()

    result = asyncio.run(drive())
    summary = summarize(result.records, result.duration_s, Slo(args.slo_ttft_ms, args.slo_tpot_ms))
    bursts = f", burstiness {args.burstiness:g}" if args.burstiness != 1.0 else ""
    title = f"{model} @ {args.base_url} ({args.endpoint}, rate {args.request_rate:g}/s{bursts})"
    print(format_table(summary, title="inferd bench serve"))
    config = {**plain_config(args), "title": title, "model": model}
    _write_outputs(args, config, summary, result)
    # A failed request fails the run (exit 1), so a script or CI job sees it; the report is written.
    if summary["failed"]:
        print(f"inferd bench: {summary['failed']} of {len(requests)} requests failed: {summary['errors']}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def run_offline(args: argparse.Namespace) -> int:
    from inferd.bench.offline import run_offline_bench

    _resolve_output_prefix(args)
    return run_offline_bench(args)


def run_compare(args: argparse.Namespace) -> int:
    from inferd.bench.compare import format_comparison, load_summary

    print(
        format_comparison(
            load_summary(args.a), load_summary(args.b), f"A: {args.a.stem}", f"B: {args.b.stem}"
        )
    )
    return 0


def plain_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's arguments for the JSON report, without the secret or the handler."""
    return {key: _plain(value) for key, value in vars(args).items() if key not in ("func", "api_key")}


def _plain(value: Any) -> Any:
    """Argument values as JSON can hold them (ranges as 'LOW:HIGH', infinity as the string 'inf')."""
    if isinstance(value, LengthRange):
        return f"{value.low}:{value.high}"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value
