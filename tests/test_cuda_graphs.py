"""Decode steps through the graph path: padding to the batch-size ladder, static buffers, and
outputs equal to eager steps. Without a GPU the capture is replaced by a replay that re-runs the
forward on the same static buffers and copies into one static output, as a graph replay does."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from graph_standin import StaticReplayCapturer  # noqa: E402

from inferd.engine.request import Request  # noqa: E402
from inferd.llm import LLM  # noqa: E402
from inferd.sampling_params import SamplingParams  # noqa: E402
from inferd.sched.output import ScheduledSequence, SchedulerOutput  # noqa: E402
from inferd.worker.cuda_graphs import MAX_GRAPH_BATCH, DecodeGraphs, context_tiers, graph_batch_sizes  # noqa: E402

pytest.importorskip("triton")
if os.environ["TRITON_INTERPRET"] != "1":
    pytest.skip("the CPU stand-in for capture needs the Triton interpreter", allow_module_level=True)


def test_ladder_is_small_sizes_then_multiples_of_eight_up_to_the_limit() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(4096)[-1] == MAX_GRAPH_BATCH


def _seq(token_ids: list[int], start: int) -> ScheduledSequence:
    request = Request("r", token_ids, SamplingParams(), frozenset(), 1)
    return ScheduledSequence(request, token_ids, start, [0, 1], True)


def test_context_tiers_give_each_split_its_own_graph() -> None:
    # The split an H200-sized default gives one sequence of 8 KV heads: up to 16, one per 256 keys.
    def splits(context: int) -> int:
        return max(1, min(16, context // 256))

    assert context_tiers(40960, splits, 511) == [511, 1023, 2047, 4095, 40960]
    assert context_tiers(40960, lambda context: 1, 511) == [40960]  # large batches: never split
    assert context_tiers(300, splits, 511) == [300]
    assert context_tiers(1000, splits, 511) == [511, 1000]
    assert context_tiers(4096, splits, 511) == [511, 1023, 2047, 4096]  # not 4095 beside 4096


def test_only_pure_decode_steps_within_the_ladder_take_a_graph() -> None:
    graphs = DecodeGraphs(
        torch.nn.Identity(),
        [],
        None,
        lambda size, tier: None,
        [1, 2, 4, 8],
        lambda size: [7, 64],  # type: ignore[arg-type]
    )
    assert graphs.tier_for(1, 3) == graphs.tier_for(1, 7) == 7
    assert graphs.tier_for(1, 8) == graphs.tier_for(1, 64) == 64
    decode = [_seq([5], 10) for _ in range(3)]
    assert graphs.padded_size(SchedulerOutput(decode, [])) == 4
    assert graphs.padded_size(SchedulerOutput(decode[:1], [])) == 1
    assert graphs.padded_size(SchedulerOutput(decode + [_seq([5, 6], 0)], [])) is None
    assert graphs.padded_size(SchedulerOutput([_seq([5], 10) for _ in range(9)], [])) is None


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_graph_decode_equals_eager_decode(tiny_model_factory, async_scheduling: bool) -> None:
    """With async scheduling (a GPU's default) each replay reads input ids that the runner wrote
    from the last step's samples into the graph's static buffer just before."""
    folder = tiny_model_factory("qwen3")
    # A first token of its own each, so no prompt waits for another's head (sched/prefixes_in_flight.py)
    # and all five decode together.
    prompts = [[100 + i, *range(6, 5 + n)] for i, n in enumerate((3, 17, 9, 30, 1))]
    # Different budgets make the batch shrink from 5 sequences to 1 over the run.
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (2, 9, 5, 12, 7)]
    options = dict(device="cpu", block_size=8, num_kv_blocks=64, max_num_seqs=6)

    # The reference is all PyTorch; the graphs run the GPU path: Triton attention and Triton ops.
    eager = LLM(folder, attention_backend="torch", **options)
    assert eager.engine.core.runner.graphs is None  # no CUDA: the engine never captures by itself
    expected = [out.token_ids for out in eager.generate(prompts, params)]

    graphed = LLM(
        folder, attention_backend="triton", triton_ops=True, async_scheduling=async_scheduling, **options
    )
    runner = graphed.engine.core.runner
    capturer = StaticReplayCapturer()
    runner.capture_decode_graphs(capturer)
    assert runner.graphs is not None and runner.graphs.batch_sizes == [1, 2, 4, 6]
    assert capturer.captured_in_inference_mode and all(capturer.captured_in_inference_mode)
    assert all(not k.any() and not v.any() for k, v in runner.kv_caches)  # capture wrote no KV
    got = [out.token_ids for out in graphed.generate(prompts, params)]

    assert got == expected
    assert len({t for seq in expected for t in seq}) > 3  # the comparison is not vacuous
    assert {6, 4, 2, 1} <= set(capturer.replayed_sizes)  # 5 -> 6 rows, 4, 3 -> 4, 2, 1


def test_short_contexts_replay_unsplit_graphs_and_long_ones_split(tiny_model_factory, monkeypatch) -> None:
    """With a GPU's SM count, small batches get split graphs per context tier; the replays follow
    the contexts as they grow, and the tokens stay those of eager all-PyTorch decode."""
    from inferd.attention import triton_kernels

    # A 64-SM device, and splits from 4 keys up, so tiny contexts cross several tiers.
    monkeypatch.setattr(triton_kernels, "num_sms", lambda device: 64)
    monkeypatch.setattr(triton_kernels, "_MIN_TOKENS_PER_SPLIT", 4)
    folder = tiny_model_factory("qwen3")
    prompts = [list(range(5, 9)), list(range(7, 10))]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    options = dict(device="cpu", block_size=8, num_kv_blocks=64, max_num_seqs=2, max_model_len=64)
    expected = [
        out.token_ids for out in LLM(folder, attention_backend="torch", **options).generate(prompts, params)
    ]

    graphed = LLM(folder, attention_backend="triton", triton_ops=True, **options)
    runner = graphed.engine.core.runner
    capturer = StaticReplayCapturer()
    runner.capture_decode_graphs(capturer)
    graphs = runner.graphs
    assert graphs is not None and graphs.tiers == {1: [7, 15, 31, 64], 2: [7, 15, 31, 64]}
    # Graphs are captured largest batch first, longest tier first.
    captured = [(size, tier) for size in (2, 1) for tier in (64, 31, 15, 7)]
    got = [out.token_ids for out in graphed.generate(prompts, params)]

    assert got == expected
    replayed = {captured[number] for number in capturer.replayed_graphs}
    # 4-token prompts grow to 44-token contexts: the 2-row graphs of every tier ran in turn.
    assert {tier for size, tier in replayed if size == 2} == {7, 15, 31, 64}


def test_gpu_switches_reach_the_runner(tiny_model_factory) -> None:
    from inferd.layers.norm import RMSNorm

    def norms_use_triton(llm: LLM) -> set[bool]:
        model = llm.engine.core.runner.model
        return {m.use_triton for m in model.modules() if isinstance(m, RMSNorm)}  # type: ignore[attr-defined]

    folder = tiny_model_factory("llama")
    llm = LLM(folder, device="cpu", enforce_eager=True, num_kv_blocks=16, max_model_len=256)
    assert llm.engine.config.enforce_eager
    assert not llm.engine.core.runner.uses_cuda_graphs()
    assert norms_use_triton(llm) == {False}  # the CPU default
    small = {"num_kv_blocks": 16, "max_model_len": 256}
    assert norms_use_triton(LLM(folder, device="cpu", triton_ops=True, **small)) == {True}
