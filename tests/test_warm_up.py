"""The start-up warm-up: its step fits every budget, it changes no request's output, and after it
a varied workload launches no Triton kernel variant that would still have to be compiled."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from graph_standin import StaticReplayCapturer  # noqa: E402

from inferd.config import SchedulerConfig  # noqa: E402
from inferd.engine.builder import build_engine_config  # noqa: E402
from inferd.llm import LLM  # noqa: E402
from inferd.sampling_params import SamplingParams  # noqa: E402
from inferd.worker.warm_up import WarmUpShape, prompt_step, sampling_mixes, warm_up_shape  # noqa: E402


def scheduler(max_num_seqs: int, max_batched: int, max_model_len: int) -> SchedulerConfig:
    return SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched, max_model_len=max_model_len
    )


ALL_SHORT = (2, 16, 17, 32, 33, 64)


def shape(
    num_seqs: int, length: int, decodes: bool, rows: int, short: tuple[int, ...] = ALL_SHORT
) -> WarmUpShape:
    return WarmUpShape((length,) * num_seqs, decodes, short, rows)


@pytest.mark.parametrize(
    ("config", "num_blocks", "block_size", "expected"),
    [
        # The token budget split over the sequence budget: the largest step the engine runs.
        (scheduler(256, 16384, 2048), 10_000, 16, shape(256, 64, True, 256)),
        # Few KV blocks: each sequence keeps to its share, with a slot left for its decode token.
        (scheduler(8, 8192, 4096), 16, 16, shape(8, 31, True, 8)),
        # More sequences than blocks: one block each.
        (scheduler(128, 8192, 4096), 40, 16, shape(40, 15, True, 128)),
        # A short context limit caps each prompt below it; the mixed sampling pass takes 7 rows.
        (scheduler(4, 8192, 100), 10_000, 16, shape(4, 99, True, 7)),
        # Blocks of one token: three blocks a sequence (two prompt tokens and a decode token).
        (scheduler(64, 8192, 4096), 50, 1, shape(16, 2, True, 64, ALL_SHORT[:5])),
        # A small token budget: fewer prompts, of two tokens each, not a step of one-token rows.
        (scheduler(256, 256, 2048), 10_000, 16, shape(128, 2, True, 256)),
        # The tokens a budget leaves over go to the first prompts.
        (
            scheduler(300, 8192, 4096),
            10_000,
            16,
            WarmUpShape((28,) * 92 + (27,) * 208, True, ALL_SHORT, 300),
        ),
        # No room for a prompt of two tokens and a decode token: one token, no decode step.
        (scheduler(4, 8192, 1), 10_000, 16, shape(4, 1, False, 7, ())),
        (scheduler(4, 8192, 4096), 1, 1, shape(1, 1, False, 7, ())),
        (scheduler(4, 8192, 1), 10_000, 1, shape(4, 1, False, 7, ())),
    ],
)
def test_the_warm_up_step_is_the_largest_within_every_budget(
    config: SchedulerConfig, num_blocks: int, block_size: int, expected: WarmUpShape
) -> None:
    got = warm_up_shape(config, num_blocks, block_size)
    assert got == expected
    assert got.prompt_tokens <= config.max_num_batched_tokens
    longest_table = -(-config.max_model_len // block_size)
    steps = [prompt_step(got.prompt_lens, got.decodes, block_size, vocab_size=400)]
    steps += [prompt_step((n,), False, block_size, vocab_size=400) for n in got.short_prompts]
    for step in steps:
        assert step.num_batched_tokens <= config.max_num_batched_tokens
        blocks = [block for seq in step.sequences for block in seq.block_table]
        assert sorted(blocks) == list(range(len(blocks))) and len(blocks) <= num_blocks  # each block once
        for seq in step.sequences:
            assert seq.sample and len(seq.block_table) <= longest_table
            assert len(seq.block_table) * block_size >= seq.num_tokens + (got.decodes and step is steps[0])


def test_the_mixed_sampling_pass_needs_a_row_of_each_kind() -> None:
    with pytest.raises(ValueError, match="needs 7 rows"):
        sampling_mixes(6, vocab_size=400)
    mixed = sampling_mixes(7, vocab_size=400)[1]
    assert len({repr(r.params) for r in mixed}) == 7


def test_the_sampling_passes_run_the_fused_race_on_half_and_float32_logits(monkeypatch) -> None:
    """A GPU engine of at least FUSED_MIN_ROWS sequences sends its temperature-only rows to the
    fused race, on the model's dtype when no row is processed and on float32 when one is (a
    penalty or bias widens the whole step): two kernel variants, both compiled at start-up."""
    from race_recorder import record_race_calls

    from inferd.sample.sampler import Sampler

    calls = record_race_calls(monkeypatch)
    rows, vocab = 8, 50
    sampler = Sampler(triton_sampling=True, fused_min_rows=rows - 1)  # as at FUSED_MIN_ROWS rows
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for requests in sampling_mixes(rows, vocab):
        sampler(logits, requests)
    assert {call.dtype for call in calls} == {torch.bfloat16, torch.float32}


@pytest.mark.parametrize("sequences", [20, 12])
def test_the_sampling_passes_grow_penalty_tables_for_a_step_of_penalized_sequences(sequences: int) -> None:
    """The penalties' count tables grow with the penalized requests; the warm-up grows a set of its
    own for as many as a step may hold (its sequences: a penalized one takes one row, never guesses),
    so tables that large are known to fit beside the KV cache before any request. 20 rows a pass
    with 12 sequences a step: the rows of speculative decoding's guesses, which no penalized
    request has."""
    from inferd.sample.penalty_tables import PenaltyTables
    from inferd.sample.sampler import Sampler

    rows, vocab = 20, 50
    sampler = Sampler(penalty_tables=True, penalty_rows=sequences)
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    for requests in sampling_mixes(rows, vocab, sequences):
        sampler(logits, requests)
    state = sampler._penalties
    assert isinstance(state, PenaltyTables)
    assert sequences <= state.num_rows < 2 * sequences


def test_a_sampling_pass_that_fails_stops_the_start(tiny_llama, monkeypatch) -> None:
    """Serving, a processor that raises fails its own rows; in the warm-up it means a path this
    engine cannot run (the penalties' tables out of memory, a kernel that does not compile)."""
    from inferd.sample.penalty_state import HostPenalties

    def out_of_memory(*args: object) -> None:
        raise MemoryError("out of device memory (simulated)")

    monkeypatch.setattr(HostPenalties, "_penalize", out_of_memory)
    with pytest.raises(RuntimeError, match="warm-up: .* rows of a sampling pass failed; .*simulated"):
        LLM(tiny_llama, device="cpu", kv_cache_memory="8MiB", warm_up=True)


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
    assert report.shape.short_prompts == (2, 16, 17, 32, 33, 64) and report.shape.sampling_rows == 7
    assert [out.token_ids for out in warm.generate(prompts, params)] == expected


# Kernels capture, which runs decode steps of the graph sizes only, never launches as a workload
# does: prompt attention, the fused sampler, and the tiled matmul for eager steps of other sizes.
_PROMPT_AND_SAMPLER_KERNELS = {"_paged_extend_kernel", "_race_chunk_kernel", "_tiled_linear_kernel"}


def test_after_the_warm_up_a_workload_needs_no_new_kernel_variant(tiny_model_factory, monkeypatch) -> None:
    """Start-up (graph capture, then the warm-up) launches every Triton kernel variant a workload
    of uneven prompts, prefix hits, chunked prompts beside decodes and every sampling path
    launches, so on a GPU none is compiled while requests wait."""
    if os.environ["TRITON_INTERPRET"] != "1":
        pytest.skip("launches are recorded through the Triton interpreter")
    from kernel_specializations import LaunchRecorder

    from inferd.layers import triton_tiled_linear
    from inferd.sample import sampler as sampler_module

    # The tiny model's projections are far narrower than the tiled matmul's floor: route them all;
    # and its few rows a step to the fused sampler, as a GPU engine's steps of 128 rows or more.
    monkeypatch.setattr(triton_tiled_linear, "MIN_FEATURES", 1)
    monkeypatch.setattr(sampler_module, "FUSED_MIN_ROWS", 1)
    llm = LLM(
        tiny_model_factory("qwen3"),
        device="cpu",
        attention_backend="triton",
        triton_ops=True,
        triton_linear=True,
        triton_fused_linear=True,
        triton_decode_rotary=True,
        triton_tiled_linear=True,
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
        # A step of 16 rows alone: a tiled matmul variant (a 16-row tile, rows a multiple of 16)
        # that only the warm-up's short prompts launch at start-up.
        llm.generate([list(range(100, 116))], SamplingParams(max_tokens=1, ignore_eos=True))
    assert _PROMPT_AND_SAMPLER_KERNELS <= workload.kernels()  # the comparison below is not vacuous
    assert [key for key in workload.keys if key not in at_start.keys] == []


def test_the_warm_up_compiles_every_routed_experts_variant(tiny_model_factory, monkeypatch) -> None:
    """The grouped matmul of ``triton_moe`` takes 16, 32 or 64 rows a program by how many tokens a
    step gives each expert: the warm-up's prompt steps reach each size, and no step's token count
    makes a variant of its own."""
    if os.environ["TRITON_INTERPRET"] != "1":
        pytest.skip("launches are recorded through the Triton interpreter")
    from kernel_specializations import LaunchRecorder

    from inferd.worker import warm_up

    # The generic short prompts happen to reach every size on this tiny model: leave them out, so
    # the steps the model asks for (``triton_moe.warm_up_token_counts``) must.
    monkeypatch.setattr(warm_up, "_SHORT_PROMPT_LENS", (2,))
    llm = LLM(tiny_model_factory("qwen3-moe"), device="cpu", triton_moe=True, warm_up=False,
              block_size=8, num_kv_blocks=128, max_num_seqs=4, max_num_batched_tokens=128)  # fmt: skip
    at_start = LaunchRecorder()
    with at_start.recording(monkeypatch):
        llm.engine.core.runner.warm_up()
    workload = LaunchRecorder()
    with workload.recording(monkeypatch):
        # Each prompt alone, in one step, none a prefix of another. 8 experts, 3 a token: 47 tokens
        # average 17 pairs an expert (32 rows a program), 90 tokens 33 (64 rows); 16 tokens make
        # 48 pairs, a multiple of 16, in programs of 16 rows, as no warm-up step does.
        for start, length in ((5, 47), (60, 90), (160, 16), (200, 61)):
            prompt = list(range(start, start + length))
            llm.generate([prompt], SamplingParams(max_tokens=2, ignore_eos=True))
    assert workload.kernels() == {"_grouped_matmul_kernel"}
    assert [key for key in workload.keys if key not in at_start.keys] == []


def test_a_model_step_longer_than_the_context_is_spread_over_prompts() -> None:
    """The routed experts' steps of 272 and 528 tokens (Qwen3-30B-A3B's shape) under a 256-token
    context: as several prompts, so each row-block size is still compiled at start-up."""
    scheduler = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=2048, max_model_len=256)
    shape = warm_up_shape(scheduler, num_blocks=200, block_size=16, model_prompt_lens=(1, 272, 528, 4096))
    assert shape.model_steps == ((1,), (255, 17), (255, 255, 18))  # 4,096: past the step budget
