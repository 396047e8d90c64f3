"""The engine flags every engine-building command shares, and the options they become."""

from __future__ import annotations

import argparse

import pytest

from inferd.entrypoints.engine_args import add_engine_args, engine_options


def parse(*flags: str) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return engine_options(parser.parse_args(list(flags)))


def test_unset_flags_leave_the_engine_defaults() -> None:
    assert parse() == {}


@pytest.mark.parametrize(
    "switch",
    [
        "async-scheduling",
        "triton-ops",
        "triton-linear",
        "triton-fused-linear",
        "triton-tiled-linear",
        "triton-decode-rotary",
        "triton-pdl",
        "triton-sampling",
        "warm-up",
    ],
)
def test_on_off_switches(switch: str) -> None:
    option = switch.replace("-", "_")
    assert parse(f"--{switch}") == {option: True}
    assert parse(f"--no-{switch}") == {option: False}


def test_the_other_flags() -> None:
    options = parse("--enforce-eager", "--no-prefix-caching", "--block-size", "32", "--seed", "7", "-tp", "2")
    assert options == {"enforce_eager": True, "enable_prefix_caching": False, "block_size": 32, "seed": 7,
                       "tensor_parallel_size": 2}  # fmt: skip
