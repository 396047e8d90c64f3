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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except Exception as exc:
        from inferd.config import ModelLoadError  # imports torch: only once a subcommand ran

        # Bad options, input or paths get a message, not a traceback; anything else is a bug.
        if not isinstance(exc, (ModelLoadError, ValueError, FileNotFoundError)):
            raise
        print(f"inferd: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
