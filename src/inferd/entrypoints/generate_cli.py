"""`inferd generate PROMPT`: stream one completion to the terminal."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from inferd.entrypoints.engine_args import add_engine_args, engine_options

if TYPE_CHECKING:
    from inferd.engine.llm_engine import LLMEngine
    from inferd.structured.spec import StructuredOutput


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text for one prompt, printed as it comes")
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--model", help="Hugging Face model folder (default: the built-in model)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="a seen token's (prompt or output) logit divided by this when positive, "
                        "multiplied when negative")  # fmt: skip
    parser.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        help="subtracted from the logit of each token the output holds",
    )
    parser.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        help="times each token's count in the output, subtracted from its logit",
    )
    parser.add_argument(
        "--min-tokens", type=int, default=0, help="tokens before EOS or a stop may end the output"
    )
    parser.add_argument("--request-seed", type=int, help="seed of this request's sampling")
    parser.add_argument("--adapter", help="answer with this LoRA adapter (one of --lora-modules)")
    parser.add_argument(
        "--chat", action="store_true", help="send the prompt as a user message through the chat template"
    )
    structured = parser.add_mutually_exclusive_group()
    text_or_file = "(its text, or @FILE)"
    structured.add_argument(
        "--json-schema", metavar="SCHEMA", help=f"the output is JSON made to this schema {text_or_file}"
    )
    structured.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    structured.add_argument("--regex", help="the whole output matches this regular expression")
    structured.add_argument("--choice", nargs="+", metavar="TEXT", help="the output is one of these")
    structured.add_argument("--grammar", help=f"the output follows this Lark or GBNF grammar {text_or_file}")
    parser.add_argument("--verbose", action="store_true", help="log engine start-up details")
    add_engine_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inferd.engine.llm_engine import LLMEngine

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    engine = LLMEngine.from_options(args.model, **engine_options(args))
    try:  # a tensor-parallel engine's ranks and rendezvous folder go with it
        return _generate(engine, args)
    finally:
        engine.shutdown()


def _generate(engine: LLMEngine, args: argparse.Namespace) -> int:
    from inferd.sampling_params import SamplingParams

    prompt = args.prompt
    if args.chat:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        # The template writes the special tokens it wants: none added again.
        prompt = engine.tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        min_tokens=args.min_tokens,
        seed=args.request_seed,
        structured_output=_structured_output(args),
        adapter=args.adapter,
    )
    # As the offline API: a --max-tokens past the context stops there ("length").
    engine.add_request("cli", prompt, params, clamp_to_context=True)
    if not args.chat:
        sys.stdout.write(args.prompt)
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
            final = out
    sys.stdout.write("\n")
    if final is not None and final.metrics.ttft_s is not None and final.metrics.e2e_s is not None:
        tokens = len(final.token_ids)
        rate = tokens / final.metrics.e2e_s if final.metrics.e2e_s > 0 else 0.0
        print(
            f"[{tokens} tokens, finish: {final.finish_reason}, time to first token "
            f"{final.metrics.ttft_s * 1000:.0f} ms, {rate:.1f} tokens/s]",
            file=sys.stderr,
        )
    return 0


def _structured_output(args: argparse.Namespace) -> StructuredOutput | None:
    """The constraint the flags ask for (a bad one is refused when SamplingParams checks it)."""
    from inferd.structured.spec import StructuredOutput

    if args.json_schema is not None:
        return StructuredOutput(json=_text_or_file(args.json_schema))
    if args.json_object:
        return StructuredOutput(json_object=True)
    if args.regex is not None:
        return StructuredOutput(regex=args.regex)
    if args.choice is not None:
        return StructuredOutput(choice=args.choice)
    if args.grammar is not None:
        return StructuredOutput(grammar=_text_or_file(args.grammar))
    return None


def _text_or_file(value: str) -> str:
    """``@PATH`` reads the file (as curl's -d does); anything else is the text itself."""
    return Path(value[1:]).read_text() if value.startswith("@") else value
