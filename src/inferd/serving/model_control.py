"""Which models a repository loads at start-up, and whether clients may load and unload models
while it serves: Triton's ``--model-control-mode`` and ``--load-model``.

``explicit`` (the default) serves the repository extension's load and unload; without
``--load-model`` every model folder loads at start-up, as inferd always did (Triton's explicit mode
loads none unless told, ``--load-model '*'`` loads them all: both are taken). ``none`` loads every
model at start-up and refuses load and unload, so no client can start or stop a model (Triton's
default): for a server whose models are set by its deployment.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

MODES = ("explicit", "none")
ALL_MODELS = "*"


class ModelControlError(ValueError):
    """Flags that do not go together."""


@dataclass(frozen=True)
class ModelControl:
    # Clients may load and unload models (the repository extension's calls).
    explicit: bool = True
    # The model folders loaded at start-up; None: every one.
    startup: frozenset[str] | None = None

    @classmethod
    def from_flags(cls, mode: str, load_models: Sequence[str]) -> ModelControl:
        if mode not in MODES:
            raise ModelControlError(f"--model-control-mode: one of {', '.join(MODES)}, got {mode!r}")
        names = frozenset(load_models)
        if names and mode != "explicit":
            raise ModelControlError(
                "--load-model needs --model-control-mode explicit (without it every model loads at start-up)"
            )
        if ALL_MODELS in names:
            if len(names) > 1:
                raise ModelControlError("--load-model '*' loads every model: give it alone")
            names = frozenset()
        return cls(explicit=mode == "explicit", startup=names or None)


def add_model_control_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--model-control-mode",
        choices=MODES,
        default="explicit",
        help="explicit: clients may load and unload models (KServe v2's repository extension); none: "
        "every model loads at start-up and load and unload are refused (Triton's flag)",
    )
    parser.add_argument(
        "--load-model",
        action="append",
        default=[],
        metavar="NAME",
        help="with --model-control-mode explicit: load only this model folder at start-up (repeat it for "
        "more; '*': every one, the default); the others are listed unloaded until a client loads them",
    )


def model_control(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ModelControl:
    """The flags' ModelControl; flags that do not go together are the parser's usage error."""
    try:
        return ModelControl.from_flags(args.model_control_mode, args.load_model)
    except ModelControlError as exc:
        parser.error(str(exc))
