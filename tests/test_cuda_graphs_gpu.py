"""On a CUDA device only: decode through captured CUDA graphs against eager decode.

Skipped without a GPU (the CPU stand-in for capture is in ``test_cuda_graphs.py``). Eager steps
choose their decode split per step and graphs fix it per batch size, so float sums differ in the
last bits: sequences must agree on their first tokens and almost all of them to the end.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs a CUDA device and compiled Triton kernels", allow_module_level=True)
pytest.importorskip("triton")

from inferd.llm import LLM  # noqa: E402
from inferd.sampling_params import SamplingParams  # noqa: E402


def test_graph_decode_matches_eager_decode_on_cuda(tiny_model_factory) -> None:
    folder = tiny_model_factory("qwen3")
    # One prompt longer than the step budget: its first chunks are steps that sample nothing,
    # the case where the next step's inputs are written while the last copy may still be queued.
    # A first token of its own each, so no prompt waits for another's head and the batch reaches 12.
    prompts = [[100 + i, *range(6, 5 + n)] for i, n in enumerate((3, 17, 9, 30, 1, 150, 44, 8, 12, 5))]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in range(10, 40, 3)]
    options = dict(device="cuda", dtype="float32", block_size=16, num_kv_blocks=256, max_num_seqs=12,
                   max_num_batched_tokens=64)  # fmt: skip

    eager = LLM(folder, enforce_eager=True, **options)
    assert eager.engine.core.runner.graphs is None
    expected = [out.token_ids for out in eager.generate(prompts, params)]

    graphed = LLM(folder, **options)
    graphs = graphed.engine.core.runner.graphs
    assert graphs is not None and graphs.batch_sizes == [1, 2, 4, 8, 12] and graphs.capture_seconds > 0
    replayed: list[int] = []
    replay = graphs.replay
    graphs.replay = lambda size, max_seq_len: replayed.append(size) or replay(size, max_seq_len)  # type: ignore[method-assign]
    got = [out.token_ids for out in graphed.generate(prompts, params)]

    assert {12, 8, 4, 2, 1} <= set(replayed)  # the batch shrank through the ladder
    assert all(g[:8] == e[:8] for g, e in zip(got, expected, strict=True))
    assert sum(g == e for g, e in zip(got, expected, strict=True)) >= len(prompts) - 1
    memory = graphed.engine.stats().device_memory_bytes  # the /metrics GPU memory gauge's source
    assert memory is not None and memory >= torch.cuda.memory_allocated()


def test_a_mixture_of_experts_decodes_in_graphs_with_triton_moe_only(tiny_model_factory) -> None:
    """The torch experts read each expert's share of the tokens on the host, which a graph cannot
    hold: without triton_moe decode runs eagerly; with it, in graphs, giving the same tokens."""
    folder = tiny_model_factory("qwen3-moe")
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 9, 30, 1, 70)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    options = dict(device="cuda", dtype="float32", block_size=16, num_kv_blocks=128, max_num_seqs=8)
    eager = LLM(folder, **options)
    assert eager.engine.core.runner.graphs is None
    expected = [out.token_ids for out in eager.generate(prompts, params)]
    graphed = LLM(folder, triton_moe=True, **options)
    assert graphed.engine.core.runner.graphs is not None
    got = [out.token_ids for out in graphed.generate(prompts, params)]
    assert all(g[:8] == e[:8] for g, e in zip(got, expected, strict=True))
    assert sum(g == e for g, e in zip(got, expected, strict=True)) >= len(prompts) - 1


def test_async_scheduling_matches_sync_on_cuda(tiny_model_factory) -> None:
    """Overlapped steps (tokens fed on the device, results read one step late, copies through
    pinned memory) give exactly the tokens of steps that wait for each result: the batches are
    the same, so are the numbers."""
    folder = tiny_model_factory("qwen3")
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 9, 30, 1, 150, 44, 8)]
    params = [
        SamplingParams(max_tokens=m, temperature=0.8, top_p=0.9, seed=m, logprobs=2, ignore_eos=True)
        for m in range(10, 34, 3)
    ]
    options = dict(device="cuda", dtype="float32", block_size=16, num_kv_blocks=256, max_num_seqs=12,
                   max_num_batched_tokens=64)  # fmt: skip
    runs = []
    for async_scheduling in (False, True):
        llm = LLM(folder, async_scheduling=async_scheduling, **options)
        assert llm.engine.core.async_scheduling is async_scheduling
        outputs = llm.generate(prompts, params)
        runs.append([(o.token_ids, [lp.top for lp in o.logprobs or []]) for o in outputs])
    assert runs[1] == runs[0]


def test_the_warm_up_is_on_by_default_and_changes_no_output_on_cuda(tiny_model_factory) -> None:
    """The start-up warm-up (a full prompt step, a graph replay, every sampling path) leaves the
    tokens of greedy, seeded and unseeded random requests as without it."""
    folder = tiny_model_factory("qwen3")
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 9, 30, 1, 150)]
    params = [
        SamplingParams(max_tokens=12, temperature=t, seed=s, ignore_eos=True)
        for t, s in ((0.0, None), (0.8, None), (0.8, 7), (1.0, None), (0.5, None), (0.8, 3))
    ]
    options = dict(device="cuda", dtype="float32", block_size=16, num_kv_blocks=256, max_num_seqs=12,
                   max_num_batched_tokens=64)  # fmt: skip
    runs = []
    for warm_up in (None, False):
        llm = LLM(folder, warm_up=warm_up, **options)
        report = llm.engine.core.runner.warm_up_report
        assert (report is not None) is (warm_up is None)  # on by default on a GPU
        runs.append([out.token_ids for out in llm.generate(prompts, params)])
    assert runs[0] == runs[1]
