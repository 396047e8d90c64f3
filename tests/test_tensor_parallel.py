"""Tensor parallelism on the CPU (gloo): a model split over two processes gives the logits and
greedy tokens of the whole model in one process, fails loudly when a rank dies, and cleans up."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.engine.request import Request
from inferd.entrypoints.engine_args import engine_options
from inferd.models.loader import shard_checkpoint_tensor
from inferd.server.serve_cli import register

pytestmark = pytest.mark.timeout(300)

OPTIONS = dict(num_kv_blocks=64, block_size=8)


def _first_step_logits(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    core = llm.engine.core
    for i, prompt in enumerate(prompts):
        core.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=1), frozenset(), 1))
    return core.runner.logits_for(core.scheduler.schedule())


# phi3: q|k|v, gate|up fused; qwen2-moe: experts and a gated shared expert split; mixtral: its names
@pytest.mark.parametrize(
    "arch",
    [
        "qwen3",
        "qwen2",
        "llama",
        "phi3",
        "qwen2-moe",
        "mixtral",
        "gemma3",
        "gemma2",
        "granite",
        "llama-attention-bias",
    ],  # fmt: skip
)
def test_two_ranks_give_the_whole_models_logits_and_tokens(tiny_model_factory, arch: str) -> None:
    """Qwen3 has per-head q/k norms, Qwen2 q/k/v biases (split with their heads), Llama neither;
    Llama with ``attention_bias`` an o_proj bias too, added once to the ranks' sum."""
    folder = tiny_model_factory(arch)
    prompts = [[5, 6, 7, 8], list(range(10, 40)), [3]]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    whole = LLM(folder, **OPTIONS)
    expected_logits = _first_step_logits(whole, prompts)
    outputs = LLM(folder, **OPTIONS).generate(prompts, params)
    expected = [out.token_ids for out in outputs]
    expected_scores = [_scores(out.prompt_logprobs) for out in outputs]

    split = LLM(folder, tensor_parallel_size=2, **OPTIONS)
    try:
        # Each rank holds half the heads, so half the KV cache per block.
        assert (
            split.engine.core.runner.kv_caches[0][0].shape[2] * 2
            == whole.engine.core.runner.kv_caches[0][0].shape[2]
        )
        logits = _first_step_logits(split, prompts)
        torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
        split.engine.core.abort(["r0", "r1", "r2"])
        split_outputs = split.generate(prompts, params)
    finally:
        split.shutdown()
    assert [out.token_ids for out in split_outputs] == expected
    # Prompt scoring reads rank 0's whole hidden states, as sampling does.
    split_scores = [_scores(out.prompt_logprobs) for out in split_outputs]
    for scores, expected_row in zip(split_scores, expected_scores, strict=True):
        assert scores == pytest.approx(expected_row, abs=1e-4)
    assert len({t for seq in expected for t in seq}) > 2  # the comparison is not vacuous


def _scores(entries: list | None) -> list[float]:  # type: ignore[type-arg]
    assert entries is not None
    return [0.0 if entry is None else entry.logprob for entry in entries]


def test_shutdown_stops_the_ranks_and_a_new_group_can_start(tiny_model_factory) -> None:
    folder = tiny_model_factory("qwen3")
    threads = torch.get_num_threads()
    first = LLM(folder, tensor_parallel_size=2, **OPTIONS)
    group = first.engine.core.runner.tensor_parallel
    assert group is not None
    processes = list(group._processes)
    first.shutdown()
    assert all(p.poll() is not None for p in processes)
    assert torch.get_num_threads() == threads  # the cores are the process's again
    second = LLM(folder, tensor_parallel_size=2, **OPTIONS)  # the process group was released
    try:
        out = second.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        assert len(out[0].token_ids) == 3
    finally:
        second.shutdown()


def test_a_dead_rank_fails_the_step_instead_of_hanging(tiny_model_factory) -> None:
    llm = LLM(tiny_model_factory("qwen3"), tensor_parallel_size=2, **OPTIONS)
    try:
        group = llm.engine.core.runner.tensor_parallel
        assert group is not None
        group._processes[0].kill()
        group._processes[0].wait(timeout=30)
        start = time.monotonic()
        with pytest.raises((RuntimeError, OSError)):
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3))
        assert time.monotonic() - start < 60
    finally:
        llm.shutdown()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(tensor_parallel_size=3), "does not divide"),
        (dict(tensor_parallel_size=0), "at least 1"),
        (dict(tensor_parallel_size=2, async_scheduling=True), "async_scheduling cannot"),
    ],
)
def test_bad_tensor_parallel_options_are_refused(tiny_model_factory, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LLM(tiny_model_factory("qwen3"), **OPTIONS, **options)


def test_checkpoint_tensors_split_by_heads_rows_and_projection_columns() -> None:
    weight = torch.arange(24.0).view(4, 6)
    q_rank1 = shard_checkpoint_tensor("model.layers.0.self_attn.q_proj.weight", weight, 1, 2)
    assert torch.equal(q_rank1, weight[2:])
    bias = torch.arange(4.0)
    assert torch.equal(shard_checkpoint_tensor("model.layers.0.self_attn.k_proj.bias", bias, 0, 2), bias[:2])
    assert torch.equal(
        shard_checkpoint_tensor("model.layers.0.mlp.down_proj.weight", weight, 1, 2), weight[:, 3:]
    )
    norm = torch.ones(6)
    assert shard_checkpoint_tensor("model.layers.0.self_attn.q_norm.weight", norm, 1, 2) is norm
    assert shard_checkpoint_tensor("lm_head.weight", weight, 1, 2) is weight


def test_a_fused_checkpoint_tensor_splits_into_its_pieces_by_the_whole_models_sizes(
    tiny_model_factory,
) -> None:
    from inferd.config import ModelConfig, ModelLoadError
    from inferd.models.loader import split_fused_tensor

    # One rank of two: 4 heads of 16 and 2 KV heads in all, so q has 64 rows and k and v 32 each.
    whole = ModelConfig.from_folder(tiny_model_factory("phi3"))
    rank = whole.sharded(2)
    qkv = torch.arange(128.0).view(128, 1)
    pieces = dict(split_fused_tensor("model.layers.1.self_attn.qkv_proj.weight", qkv, rank, 2))
    assert {name: tuple(t.shape) for name, t in pieces.items()} == {
        "model.layers.1.self_attn.q_proj.weight": (64, 1),
        "model.layers.1.self_attn.k_proj.weight": (32, 1),
        "model.layers.1.self_attn.v_proj.weight": (32, 1),
    }
    assert torch.equal(pieces["model.layers.1.self_attn.v_proj.weight"], qkv[96:])
    gate_up = torch.arange(256.0)
    up = dict(split_fused_tensor("model.layers.0.mlp.gate_up_proj.bias", gate_up, rank, 2))[
        "model.layers.0.mlp.up_proj.bias"
    ]
    assert torch.equal(up, gate_up[128:])
    with pytest.raises(ModelLoadError, match="has 100 rows, expected 128"):
        list(split_fused_tensor("model.layers.0.self_attn.qkv_proj.weight", torch.ones(100, 1), rank, 2))
    assert list(split_fused_tensor("model.norm.weight", gate_up, rank, 2))[0][1] is gate_up


def test_the_serve_flag_reaches_the_engine_options(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--tensor-parallel-size", "2"])
    assert engine_options(args)["tensor_parallel_size"] == 2


def test_a_failure_mid_step_stops_the_group_and_every_later_step_fails(tiny_model_factory) -> None:
    """Rank 0 fails after the other ranks got the step: their all-reduces are now out of step with
    rank 0's, so the group stops rather than pair the next step's collectives with these."""
    llm = LLM(tiny_model_factory("qwen3"), tensor_parallel_size=2, **OPTIONS)
    runner = llm.engine.core.runner
    group = runner.tensor_parallel
    assert group is not None
    processes = list(group._processes)
    mlp = runner.model.model.layers[1].mlp  # type: ignore[attr-defined]
    forward = mlp.forward

    def fail_once(x: torch.Tensor) -> torch.Tensor:
        mlp.forward = forward
        raise MemoryError("rank 0 only")

    mlp.forward = fail_once
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    try:
        with pytest.raises(MemoryError):
            llm.generate([[1, 2, 3]], params)
        with pytest.raises(RuntimeError, match="tensor-parallel step failed"):
            llm.generate([[1, 2, 3]], params)
        assert runner.tensor_parallel is None
        assert all(p.poll() is not None for p in processes)
        assert not torch.distributed.is_initialized()
    finally:
        llm.shutdown()


def test_a_failed_start_releases_the_group(tiny_model_factory, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_model_factory("qwen3"), broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(Exception, match="model.safetensors"):
        LLM(broken, tensor_parallel_size=2, **OPTIONS)
    assert not torch.distributed.is_initialized()
    good = LLM(tiny_model_factory("qwen3"), tensor_parallel_size=2, **OPTIONS)
    good.shutdown()


def test_a_rank_that_cannot_start_fails_start_up_at_once(tiny_model_factory, monkeypatch) -> None:
    import sys

    monkeypatch.setattr(sys, "executable", "/bin/false")  # the ranks' interpreter exits at once
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank exited"):
        LLM(tiny_model_factory("qwen3"), tensor_parallel_size=2, **OPTIONS)
    assert time.monotonic() - start < 60
    assert not torch.distributed.is_initialized()


def test_one_tensor_parallel_engine_per_process(tiny_model_factory) -> None:
    first = LLM(tiny_model_factory("qwen3"), tensor_parallel_size=2, **OPTIONS)
    try:
        with pytest.raises(RuntimeError, match="already runs a tensor-parallel engine"):
            LLM(tiny_model_factory("qwen3"), tensor_parallel_size=2, **OPTIONS)
        out = first.generate([[1, 2]], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        assert len(out[0].token_ids) == 2  # the first one is untouched
    finally:
        first.shutdown()


def test_every_rank_switches_the_kernels_the_config_asks_for(tiny_model_factory) -> None:
    """The engine and the other ranks switch their kernels through one function, which passes on
    each of the config's kernel options (the CPU defaults leave them all off)."""
    from inferd.engine.builder import build_engine_config
    from inferd.models.loader import enable_configured_kernels

    calls: list[tuple[bool, ...]] = []

    class Model:
        def enable_triton_ops(self, *switches: bool) -> None:
            calls.append(switches)

    on, off = True, False
    cases = {  # options -> (ops, linear, fused_linear, tiled_linear, decode_rotary, moe)
        (("triton_ops", on), ("triton_fused_linear", on), ("triton_tiled_linear", on)): (
            *(on, on, on, on),
            *(off, off),
        ),
        (("triton_ops", on), ("triton_linear", off)): (on, off, off, off, off, off),
        (("triton_linear", on),): (off, on, off, off, off, off),
        (("triton_tiled_linear", on),): (off, off, off, on, off, off),
        (("triton_ops", on), ("attention_backend", "triton"), ("triton_decode_rotary", on)): (
            on,
            on,
            off,
            off,
            on,
            off,
        ),
        (("triton_moe", on),): (off, off, off, off, off, on),
        (): (False,) * 6,
    }
    for options in cases:
        config = build_engine_config(tiny_model_factory("llama"), device="cpu", **dict(options))
        enable_configured_kernels(Model(), config)  # type: ignore[arg-type]
    assert calls == list(cases.values())


def test_a_row_split_projections_bias_is_added_by_rank_0_alone() -> None:
    """o_proj and down_proj outputs are summed over the ranks: their bias once, not per rank."""
    bias = torch.arange(4.0)
    name = "model.layers.0.self_attn.o_proj.bias"
    assert torch.equal(shard_checkpoint_tensor(name, bias, 0, 2), bias)
    assert torch.equal(shard_checkpoint_tensor(name, bias, 1, 2), torch.zeros(4))


def test_two_ranks_make_their_own_slices_8_bit_floats(tiny_model_factory) -> None:
    """``quantization="fp8"`` over two ranks: each rank makes its slice 8-bit floats with a scale
    per output row. A projection split by output rows (q|k|v, gate|up) gets the whole model's
    scales; one split by input columns (o_proj, down) a scale per row of each rank's half. The
    logits are those of the float model holding exactly those values, so a rank that kept its
    slice wide, or took the whole row's scale, shows."""
    from inferd.layers.quantized import quantize

    folder = tiny_model_factory("llama")
    prompts = [[5, 6, 7, 8], list(range(10, 40)), [3]]

    def round_trip(weight: torch.Tensor) -> torch.Tensor:
        values, scale = quantize(weight, (1, weight.shape[1]), "fp8")
        return values.float() * scale

    reference = LLM(folder, **OPTIONS)
    with torch.no_grad():
        for layer in reference.engine.core.runner.model.model.layers:
            for row_split in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj):
                row_split.weight.copy_(round_trip(row_split.weight))
            for column_split in (layer.self_attn.o_proj, layer.mlp.down_proj):
                halves = column_split.weight.chunk(2, dim=1)
                column_split.weight.copy_(torch.cat([round_trip(half) for half in halves], dim=1))
    expected = _first_step_logits(reference, prompts)
    split = LLM(folder, quantization="fp8", tensor_parallel_size=2, **OPTIONS)
    try:
        layer = split.engine.core.runner.model.model.layers[0]
        assert layer.mlp.down_proj.weight.dtype == torch.float8_e4m3fn
        logits = _first_step_logits(split, prompts)
    finally:
        split.shutdown()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    whole = _first_step_logits(LLM(folder, quantization="fp8", **OPTIONS), prompts)
    assert (whole - expected).abs().max() > 1e-3  # the halves' scales do matter here


@pytest.mark.parametrize(
    ("arch", "layout"),
    [
        ("llama", "fp8-block"),
        ("llama", "ct-channel"),
        ("llama", "ct-tensor"),
        ("llama", "ct-w8a8"),
        ("llama", "ct-w4a16"),
        ("llama", "ct-w4a16-asym"),
        ("llama", "ct-w8a16"),
        ("llama", "gptq-int4"),
        ("llama", "gptq-int4-asym"),
        ("llama", "gptq-int8"),
        ("llama", "gptq-int4-channel"),
        ("llama", "awq"),
        ("qwen3-moe", "fp8-block"),
        ("phi3", "ct-tensor"),
        ("phi3", "fp8-block"),
        ("phi3", "ct-w4a16-asym"),
    ],  # fmt: skip
)
def test_two_ranks_split_a_low_bit_checkpoint_as_they_split_a_wide_one(
    tiny_model_factory, tmp_path, arch: str, layout: str
) -> None:
    """Low-bit values and their scales split with their rows and columns: 8-bit floats in blocks
    of 16 x 32, with a scale per row (o_proj's and down's, split by input columns, keep every
    row's) or per tensor (every rank's); int8 values; 4- and 8-bit integers packed into int32
    words along the input, in groups of 32 columns, with zero points packed down the rows
    (compressed-tensors) or not (GPTQ, AWQ), and the packed weight's shape made each rank's; a
    mixture's experts too, in blocks of 16 x 16 (each rank holds 16 of an expert's 32 units); and
    Phi-3's fused q|k|v and gate|up, whose scales, zero points and stored shapes are split into the
    pieces first (a per-tensor scale is each piece's). The logits are one rank's."""
    import quantized_checkpoints as made

    source = tiny_model_factory(arch)
    if arch == "qwen3-moe":
        folder = made.make_fp8_checkpoint(source, tmp_path / layout, layout, block_size=(16, 16))
    elif layout in made.GPTQ_AWQ_LAYOUTS:
        folder = made.make_gptq_awq_checkpoint(source, tmp_path / layout, layout, tmp_path / "wide")
    else:
        folder = made.make_checkpoint(source, tmp_path / layout, layout)
    prompts = [[5, 6, 7, 8], list(range(10, 40)), [3]]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    whole = LLM(folder, **OPTIONS)
    expected_logits = _first_step_logits(whole, prompts)
    expected = [out.token_ids for out in LLM(folder, **OPTIONS).generate(prompts, params)]
    split = LLM(folder, tensor_parallel_size=2, **OPTIONS)
    try:
        logits = _first_step_logits(split, prompts)
        split.engine.core.abort(["r0", "r1", "r2"])
        tokens = [out.token_ids for out in split.generate(prompts, params)]
    finally:
        split.shutdown()
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    assert tokens == expected


def test_checkpoints_whose_values_do_not_split_are_refused(tiny_model_factory, tmp_path) -> None:
    from quantized_checkpoints import make_fp8_checkpoint, make_gptq_awq_checkpoint

    source = tiny_model_factory("llama")
    reordered = make_gptq_awq_checkpoint(source, tmp_path / "act", "gptq-int4-act-order", tmp_path / "wide")
    with pytest.raises(ValueError, match="GPTQ weights in activation order .desc_act. is not supported"):
        LLM(reordered, tensor_parallel_size=2, **OPTIONS)
    # Each rank's 16 key and value rows are half a block of 32.
    wide_blocks = make_fp8_checkpoint(source, tmp_path / "blocks", "fp8-block", block_size=(32, 32))
    with pytest.raises(ValueError, match="each rank 16 key and value rows, not whole blocks of 32"):
        LLM(wide_blocks, tensor_parallel_size=2, **OPTIONS)
