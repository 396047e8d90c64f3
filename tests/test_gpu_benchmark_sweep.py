"""benchmarks/gpu.py's decode-tile sweep, at toy sizes through the Triton interpreter."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton_device  # noqa: F401  (sets up the interpreter before triton is imported)

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import gpu  # noqa: E402
from roofline import Ceilings  # noqa: E402

from inferd.attention import triton_kernels  # noqa: E402


def test_decode_sweep_times_each_tile_checks_it_and_restores_the_default(monkeypatch) -> None:
    monkeypatch.setattr(gpu, "DECODE_TILES", [(64, 4, 3), (16, 2, 2)])
    monkeypatch.setattr(gpu, "DECODE_HEADS_FIRST_TILES", [(64, 4, 3)])
    launched_heads_first = []  # the launch order each kernel call saw
    grid = triton_kernels._decode_grid

    def recorded_grid(*args: int) -> tuple[int, int, int]:
        launched_heads_first.append(triton_kernels._DECODE_HEADS_FIRST)
        return grid(*args)

    monkeypatch.setattr(triton_kernels, "_decode_grid", recorded_grid)
    gpu.torch.manual_seed(0)
    plan = gpu.Plan("cpu", gpu.torch.float32, 3, 40, 30, 8, 500, "64MiB")
    config = gpu.shape_config(gpu.QWEN3_0_6B, smoke=True)
    results = gpu.sweep_decode_kernel(config, plan, Ceilings(bandwidth_bytes_s=1e9, matmul_flops_s=1e9))
    tiles = [(r["block_n"], r["num_warps"], r["num_stages"], r["heads_first"]) for r in results]
    assert tiles == [(64, 4, 3, False), (16, 2, 2, False), (64, 4, 3, True)]
    # Contexts up to 69 tokens: a 16-key tile adds them up in another order, within float error.
    assert results[0]["relative_error_vs_default"] == 0.0
    assert 0.0 < results[1]["relative_error_vs_default"] < 1e-5
    assert results[2]["relative_error_vs_default"] == 0.0  # the same programs, in another order
    assert all(r["us"] > 0 and r["kv_bytes_per_s"] > 0 for r in results)
    tile = (triton_kernels._DECODE_BLOCK_N, triton_kernels._DECODE_NUM_WARPS)
    assert tile == (64, 4) and triton_kernels._DECODE_NUM_STAGES == 2
    assert triton_kernels._DECODE_HEADS_FIRST is True
    # The reference (the default, heads first), then the same number of calls for each of the
    # three tiles: the last heads first.
    per_tile = (len(launched_heads_first) - 1) // 3
    assert launched_heads_first == [True] + [False] * (2 * per_tile) + [True] * per_tile


def test_sweeps_stop_between_cases_once_the_budget_is_spent(monkeypatch) -> None:
    """A sweep started just before the budget ends stops at its next case, results kept."""
    monkeypatch.setattr(gpu, "DECODE_TILES", [(64, 4, 3), (16, 2, 2)])
    monkeypatch.setattr(gpu, "DECODE_HEADS_FIRST_TILES", [])
    checks = iter([False, True])
    monkeypatch.setattr(gpu.BUDGET, "spent", lambda: next(checks))
    plan = gpu.Plan("cpu", gpu.torch.float32, 3, 40, 30, 8, 500, "64MiB")
    config = gpu.shape_config(gpu.QWEN3_0_6B, smoke=True)
    results = gpu.sweep_decode_kernel(config, plan, Ceilings(bandwidth_bytes_s=1e9, matmul_flops_s=1e9))
    assert [r.get("block_n") for r in results] == [64, None] and "skipped" in results[-1]
    monkeypatch.setattr(gpu.BUDGET, "spent", lambda: True)
    assert [list(r) for r in gpu.sweep_decode_splits(config, plan)] == [["skipped"]]
    ceilings = Ceilings(bandwidth_bytes_s=1e9, matmul_flops_s=1e9)
    assert [list(r) for r in gpu.sweep_skinny_linear(plan, ceilings)] == [["skipped"]]


def test_skinny_linear_sweep_times_cublas_and_triton_with_their_errors() -> None:
    plan = gpu.Plan("cpu", gpu.torch.float32, 3, 40, 30, 8, 500, "64MiB")
    results = gpu.sweep_skinny_linear(plan, Ceilings(bandwidth_bytes_s=1e9, matmul_flops_s=1e9))
    assert {(r["rows"], r["kernel"]) for r in results} == {
        (rows, kernel) for rows in gpu.LINEAR_ROWS for kernel in ("cublas", "triton default")
    }
    assert all(r["relative_error"] < 1e-5 and r["us"] > 0 and r["fraction_of_bandwidth"] > 0 for r in results)


def test_fused_input_sweep_times_each_path_with_its_error() -> None:
    """Each projection's three paths (small op then cuBLAS, then the skinny matmul, and fused)
    run at one and two rows and agree with the float32 torch layers."""
    plan = gpu.Plan("cpu", gpu.torch.float32, 3, 40, 30, 8, 500, "64MiB")
    results = gpu.sweep_fused_inputs(plan, Ceilings(bandwidth_bytes_s=1e9, matmul_flops_s=1e9))
    paths = {
        "toy norm": ("norm, cublas", "norm, triton", "fused"),
        "toy silu": ("silu, cublas", "silu, triton", "fused"),
    }
    assert [(r["shape"], r["rows"], r["kernel"]) for r in results] == [
        (shape, rows, path) for shape, labels in paths.items() for rows in (1, 2) for path in labels
    ]
    assert all(r["relative_error"] < 1e-5 and r["us"] > 0 and r["fraction_of_bandwidth"] > 0 for r in results)


def test_tiled_linear_sweep_times_cublas_and_triton_with_their_errors() -> None:
    plan = gpu.Plan("cpu", gpu.torch.float32, 3, 40, 30, 8, 500, "64MiB")
    results = gpu.sweep_tiled_linear(plan, Ceilings(bandwidth_bytes_s=1e9, matmul_flops_s=1e9))
    assert [(r["rows"], r["kernel"]) for r in results] == [
        (rows, kernel) for rows in (3, 20) for kernel in ("cublas", "triton default")
    ]
    assert all(r["relative_error"] < 1e-5 and r["us"] > 0 and r["fraction_of_bandwidth"] > 0 for r in results)


def test_split_sweep_checks_each_split_against_the_unsplit_kernel(monkeypatch) -> None:
    # Timing through the interpreter would take long and prove nothing.
    monkeypatch.setattr(gpu, "_seconds_per_call", lambda calls, plan, repeats: 1e-6)
    gpu.torch.manual_seed(0)
    plan = gpu.Plan("cpu", gpu.torch.float32, 3, 40, 30, 8, 500, "64MiB")
    results = gpu.sweep_decode_splits(gpu.shape_config(gpu.QWEN3_0_6B, smoke=True), plan)
    cases = [(r["num_seqs"], r["shortest_context"], r["context"], r["num_splits"]) for r in results]
    assert cases == [(2, 100, 150, 1), (2, 100, 150, 2)]
    assert results[0]["relative_error_vs_unsplit"] == 0.0
    # Split and merged, the sums run in another order: within float error, but not bit-equal.
    assert 0.0 < results[1]["relative_error_vs_unsplit"] < 1e-5


def test_sampler_timing_covers_greedy_and_random_rows_and_the_fused_kernels(monkeypatch) -> None:
    """Each path timed, the fused kernels after a check that they draw the argmax when cold; a
    kernel that draws something else is marked."""
    from inferd.sample import triton_inverse_cdf, triton_sampling
    from inferd.sample.penalty_tables import PenaltyTables

    plan = gpu.Plan("cpu", torch.float32, 3, 40, 30, 8, 500, "64MiB")
    shape = gpu.shape_config(gpu.QWEN3_0_6B, smoke=True)
    results = gpu.time_sampler(shape, plan)
    cases = [(r["rows"], r["temperature"], r["path"]) for r in results]
    assert cases == [
        (2, 0.0, "torch"),
        (2, 0.6, "torch"),
        (2, 0.6, "fused"),
        (2, 0.6, "fused_inverse_cdf"),
        (2, 0.6, "torch_penalized"),
        (2, 0.6, "triton_penalized"),
    ]
    assert [r.get("draws_argmax") for r in results] == [None, None, True, True, None, None]
    assert all(r["ms"] > 0 and 0 < r["host_ms"] for r in results)
    # The penalties' count tables made the same logits as the host's histories, both ways.
    assert [r["tables_vs_host_max_abs_diff"] for r in results[-2:]] == [0.0, 0.0]
    first_token = lambda logits, *_: torch.zeros(len(logits), dtype=torch.long)  # noqa: E731
    monkeypatch.setattr(triton_inverse_cdf, "inverse_cdf_sample", first_token)
    marks = [r.get("draws_argmax") for r in gpu.time_sampler(shape, plan)]
    assert marks == [None, None, True, False, None, None]
    monkeypatch.setattr(triton_sampling, "race_sample", first_token)
    marks = [r.get("draws_argmax") for r in gpu.time_sampler(shape, plan)]
    assert marks == [None, None, False, False, None, None]
    # Tables that lose the prompt's tokens are told apart, both ways.
    monkeypatch.setattr(PenaltyTables, "_take", lambda self, started, known, vocab, device: None)
    assert all(r["tables_vs_host_max_abs_diff"] > 0 for r in gpu.time_sampler(shape, plan)[-2:])
