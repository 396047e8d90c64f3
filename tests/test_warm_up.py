"""The start-up warm-up: its step fits every budget, it changes no request's output, and after it
a varied workload launches no Triton kernel variant that would still have to be compiled."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from graph_standin import StaticReplayCapturer  # noqa: E402

from inferd.config import SchedulerConfig  # noqa: E402
from inferd.engine.builder import build_engine_config  # noqa: E402
from inferd.llm import LLM  # noqa: E402
from inferd.sampling_params import SamplingParams  # noqa: E402
from inferd.worker.warm_up import WarmUpShape, prompt_step, warm_up_requests, warm_up_shape  # noqa: E402


def scheduler(max_num_seqs: int, max_batched: int, max_model_len: int) -> SchedulerConfig:
    return SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched, max_model_len=max_model_len
    )


@pytest.mark.parametrize(
    ("config", "num_blocks", "block_size", "expected"),
    [
        # The token budget split over the sequence budget: the largest step the engine runs.
        (scheduler(256, 16384, 2048), 10_000, 16, WarmUpShape(256, 64, True)),
        # Few KV blocks: each sequence keeps to its share, with a slot left for its decode token.
        (scheduler(8, 8192, 4096), 16, 16, WarmUpShape(8, 31, True)),
        # More sequences than blocks: one block each.
        (scheduler(128, 8192, 4096), 40, 16, WarmUpShape(40, 15, True)),
        # A short context limit caps each prompt below it.
        (scheduler(4, 8192, 100), 10_000, 16, WarmUpShape(4, 99, True)),
        # Blocks of one token: two blocks a sequence at least.
        (scheduler(64, 8192, 4096), 50, 1, WarmUpShape(25, 1, True)),
        # A context of one token leaves no room to decode.
        (scheduler(4, 8192, 1), 10_000, 16, WarmUpShape(4, 1, False)),
    ],
)
def test_the_warm_up_step_is_the_largest_within_every_budget(
    config: SchedulerConfig, num_blocks: int, block_size: int, expected: WarmUpShape
) -> None:
    shape = warm_up_shape(config, num_blocks, block_size)
    assert shape == expected
    assert shape.prompt_tokens <= config.max_num_batched_tokens
    step = prompt_step(warm_up_requests(shape, vocab_size=400), block_size)
    blocks = [block for seq in step.sequences for block in seq.block_table]
    assert sorted(blocks) == list(range(len(blocks))) and len(blocks) <= num_blocks  # each block once
    assert all(len(seq.token_ids) == shape.prompt_len and seq.sample for seq in step.sequences)


def test_on_by_default_on_a_gpu_only(tiny_llama) -> None:
    assert build_engine_config(tiny_llama, device="cuda").uses_warm_up
    assert not build_engine_config(tiny_llama, device="cuda", warm_up=False).uses_warm_up
    assert not build_engine_config(tiny_llama, device="cpu").uses_warm_up
    assert build_engine_config(tiny_llama, device="cpu", warm_up=True).uses_warm_up


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_the_warm_up_changes_no_output(tiny_llama, async_scheduling: bool) -> None:
    """Its K/V lands in blocks no request holds yet and it draws from its own sampler: greedy,
    seeded and unseeded random requests (the engine's generator) come out the same."""
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 9, 30)]
    params = [
        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0.9, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0.9, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=8, top_p=0.8, ignore_eos=True),
    ]
    options = dict(device="cpu", block_size=8, num_kv_blocks=64, max_num_seqs=6)
    options["async_scheduling"] = async_scheduling
    cold = LLM(tiny_llama, warm_up=False, **options)
    assert cold.engine.core.runner.warm_up_report is None
    expected = [out.token_ids for out in cold.generate(prompts, params)]
    warm = LLM(tiny_llama, warm_up=True, **options)
    report = warm.engine.core.runner.warm_up_report
    assert report is not None and report.shape.num_seqs == 6 and report.shape.decodes
    assert [out.token_ids for out in warm.generate(prompts, params)] == expected


# The kernels only a prompt step or the fused sampler launches: capture, which runs decode steps
# only, never reaches them.
_PROMPT_AND_SAMPLER_KERNELS = {"_paged_extend_kernel", "_race_chunk_kernel"}


def test_after_the_warm_up_a_workload_needs_no_new_kernel_variant(tiny_model_factory, monkeypatch) -> None:
    """Start-up (graph capture, then the warm-up) launches every Triton kernel variant a workload
    of uneven prompts, prefix hits, chunked prompts beside decodes and every sampling path
    launches, so on a GPU none is compiled while requests wait."""
    if os.environ["TRITON_INTERPRET"] != "1":
        pytest.skip("launches are recorded through the Triton interpreter")
    from kernel_specializations import LaunchRecorder

    llm = LLM(
        tiny_model_factory("qwen3"),
        device="cpu",
        attention_backend="triton",
        triton_ops=True,
        triton_linear=True,
        triton_fused_linear=True,
        triton_decode_rotary=True,
        triton_sampling=True,
        async_scheduling=True,
        warm_up=False,  # run by hand below, after the stand-in capture
        block_size=8,
        num_kv_blocks=64,
        max_num_seqs=4,
        max_model_len=96,
        max_num_batched_tokens=24,
    )
    runner = llm.engine.core.runner
    at_start = LaunchRecorder()
    with at_start.recording(monkeypatch):
        runner.capture_decode_graphs(StaticReplayCapturer())
        runner.warm_up()
    shared = list(range(7, 27))
    prompts = [shared + [3], list(range(40, 45)), [9], shared + [4, 5], list(range(50, 90))]
    params = [
        SamplingParams(max_tokens=3, temperature=0.7, ignore_eos=True),
        SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=4, top_p=0.8, logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=3, seed=1, ignore_eos=True),
        SamplingParams(max_tokens=2, temperature=0.9, ignore_eos=True),
    ]
    workload = LaunchRecorder()
    with workload.recording(monkeypatch):
        llm.generate(prompts, params)
    assert _PROMPT_AND_SAMPLER_KERNELS <= workload.kernels()  # the comparison below is not vacuous
    assert [key for key in workload.keys if key not in at_start.keys] == []
