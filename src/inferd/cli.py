"""`inferd` command line: parse arguments and hand off to the subcommand's module; no logic here."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes `register(subparsers)`, which adds its parser and sets `func` on it.
# Imported lazily-ish: the modules keep their heavy imports inside their run functions.
_SUBCOMMAND_MODULES = (
    "inferd.entrypoints.generate_cli",
    "inferd.server.serve_cli",
    "inferd.entrypoints.run_batch",
    "inferd.bench.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferd", description="LLM and classic-model inference server.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    _without_abbreviations(parser)
    return parser


def _without_abbreviations(parser: argparse.ArgumentParser) -> None:
    """Refuse abbreviated options in every (sub)command: argparse would read vLLM's ``--model`` as
    ``--model-repository`` and serve the wrong model without a word."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _without_abbreviations(subparser)


def _take_model_option(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``--model FOLDER`` (vLLM's spelling) where a command takes the model folder as its first
    argument; both at once must agree."""
    option = getattr(args, "model_option", None)
    if option is None:
        return
    if args.model is not None and args.model != option:
        parser.error(f"the model is given twice: {args.model!r} and --model {option!r}")
    args.model = option


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _take_model_option(args, parser)
    try:
        result = args.func(args)
    except Exception as exc:
        from inferd.config import ModelLoadError  # imports torch: only once a subcommand ran

        # Bad options, input or paths (a folder where a file goes, one not readable) and numbers past
        # a float's range get a message, not a traceback; anything else is a bug.
        if not isinstance(exc, (ModelLoadError, ValueError, OSError, OverflowError)):
            raise
        print(f"inferd: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
