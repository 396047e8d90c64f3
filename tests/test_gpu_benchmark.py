"""The arithmetic of benchmarks/gpu.py: roofline floors and the nano-vllm workload draw."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import gpu  # noqa: E402
from roofline import Ceilings, ModelShape, decode_floor_s, generation_floor_s, prefill_floor_s, step_floor_s  # noqa: E402

from inferd import SamplingParams  # noqa: E402

H200 = Ceilings(bandwidth_bytes_s=4.27e12, matmul_flops_s=791e12)


def test_a_batch1_decode_step_is_bound_by_weights_plus_kv_over_bandwidth() -> None:
    shape = ModelShape(1000, 64, 128, 2, 4, 2, 16, tie_word_embeddings=True)
    ceilings = Ceilings(bandwidth_bytes_s=1e9, matmul_flops_s=1e18)
    # Two steps after the prefill: contexts of 11 and 12 tokens.
    expected = (2 * shape.weight_bytes_per_step + (11 + 12) * shape.kv_bytes_per_token) / 1e9
    assert decode_floor_s(shape, [10], [3], ceilings) == pytest.approx(expected)


def test_compute_bound_steps_use_the_matmul_rate() -> None:
    shape = ModelShape(1000, 64, 128, 2, 4, 2, 16, tie_word_embeddings=True)
    ceilings = Ceilings(bandwidth_bytes_s=1e18, matmul_flops_s=1e9)
    assert decode_floor_s(shape, [10], [2], ceilings) == pytest.approx(shape.flops_per_token(11) / 1e9)


@pytest.mark.parametrize("ceilings", [Ceilings(1e9, 1e18), Ceilings(1e18, 1e9)], ids=["bytes", "flops"])
def test_a_steps_floor_as_scheduled_matches_the_ideal_schedules_steps(ceilings: Ceilings) -> None:
    """Decode spans (start, 1) give the ideal decode step's floor; a whole prompt from 0 gives the
    prefill's; a prompt chunk after cached tokens pays for its keys and its later positions."""
    shape = ModelShape(1000, 64, 128, 2, 4, 2, 16, tie_word_embeddings=True)
    # Prompts of 10 and 20 tokens, 3 and 2 tokens out: step 1 decodes at contexts 11 and 21.
    decode = decode_floor_s(shape, [10, 20], [3, 2], ceilings)
    step1 = step_floor_s(shape, [(10, 1), (20, 1)], ceilings)
    step2 = step_floor_s(shape, [(11, 1)], ceilings)
    assert step1 + step2 == pytest.approx(decode)
    assert step_floor_s(shape, [(0, 10), (0, 20)], ceilings) == pytest.approx(
        prefill_floor_s(shape, [10, 20], ceilings)
    )
    chunk_bytes = shape.weight_bytes_per_step + 30 * shape.kv_bytes_per_token
    chunk_flops = sum(shape.flops_per_token(c) for c in range(21, 31))
    expected = max(chunk_bytes / ceilings.bandwidth_bytes_s, chunk_flops / ceilings.matmul_flops_s)
    assert step_floor_s(shape, [(20, 10)], ceilings) == pytest.approx(expected)


def test_real_shape_floors_are_where_the_issue_puts_them() -> None:
    llama = gpu.model_shape(gpu.LLAMA_3_1_8B, torch.bfloat16)
    qwen = gpu.model_shape(gpu.QWEN3_0_6B, torch.bfloat16)
    # ~266 tok/s counting the untied embedding table as read; the floor here leaves it out.
    assert 260 < 255 / decode_floor_s(llama, [16], [256], H200) < 290
    plan = gpu.Plan("cuda", torch.bfloat16, 256, 1024, 1024, 256, 10000, "48GiB")
    prompts, output_lens = gpu.nano_vllm_workload(plan)
    floor_tok_s = sum(output_lens) / generation_floor_s(qwen, [len(p) for p in prompts], output_lens, H200)
    assert 30_000 < floor_tok_s < 45_000  # "about 40,000"


def test_workload_is_nano_vllms_draw() -> None:
    plan = gpu.Plan("cuda", torch.bfloat16, 256, 1024, 1024, 256, 10000, "48GiB")
    prompts, output_lens = gpu.nano_vllm_workload(plan)
    assert len(prompts) == len(output_lens) == 256
    assert all(100 <= len(p) <= 1024 for p in prompts) and all(100 <= n <= 1024 for n in output_lens)
    assert max(t for p in prompts for t in p) <= 10000
    assert output_lens[:5] == [845, 312, 607, 843, 500]
    assert gpu.nano_vllm_workload(plan) == (prompts, output_lens)


def test_workload_run_times_its_steps_by_kind(tiny_model_factory) -> None:
    """Every launched step lands in one group (prompt steps apart, decode steps by batch size),
    the groups' seconds and the time before the first launch add up to the run's, and the
    runner's own launch is back afterwards."""
    from inferd import LLM

    llm = LLM(tiny_model_factory("llama"), kv_cache_memory="4MiB", max_num_batched_tokens=32, device="cpu")
    runner = llm.engine.core.runner
    prompts = [[(5 * i + j) % 100 for i in range(length)] for j, length in enumerate((40, 7, 9))]
    floors: list[list[tuple[int, int]]] = []

    def step_floor(spans: list[tuple[int, int]]) -> float:
        floors.append(spans)
        return 1e-3 * sum(n for _, n in spans)  # a millisecond a token: checkable sums

    measured = gpu.run_inferd_workload(llm, prompts, [6, 3, 12], step_floor)
    steps = measured["steps"]
    # Each step's spans go to the floor: every prompt token but the 16 the warm-up left in the
    # prefix cache, and the 18 tokens decoded after the prefills' first ones.
    scheduled = sum(map(len, prompts)) - 16 + 18
    assert sum(n for spans in floors for _, n in spans) == scheduled
    assert sum(g["floor_seconds"] for g in steps.values()) == pytest.approx(1e-3 * scheduled)
    for group in steps.values():
        assert group["fraction_of_floor"] == pytest.approx(group["floor_seconds"] / group["seconds"])
    assert measured["output_tokens"] == 21
    # The 40-token prompt needs two steps of at most 32 tokens; 12 tokens for the last one alone.
    assert steps["with prompt tokens"]["steps"] >= 2
    assert steps["decode <= 2"]["steps"] >= 6 and "decode <= 8" in steps
    accounted = sum(g["seconds"] for g in steps.values()) + measured["before_first_step_s"]
    assert accounted == pytest.approx(measured["seconds"])
    assert all(g["ms_per_step"] == pytest.approx(1e3 * g["seconds"] / g["steps"]) for g in steps.values())
    # Synchronous on the CPU: the launch runs the whole step, a part of each step's period.
    assert all(0 < g["host_launch_seconds"] <= g["seconds"] for g in steps.values())
    assert not any("device_busy_seconds" in g for g in steps.values())  # no events on the CPU
    assert "launch" not in vars(runner)


def test_the_default_engine_repeats_the_workload_on_other_token_ids_and_takes_the_median(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each repeat sends the same lengths with every token id shifted, so no prompt is a prefix
    hit of another run's; the median of all runs and each repeat are recorded and printed."""
    plan = gpu.Plan("cpu", torch.float32, 4, 40, 30, 8, 500, "64MiB")
    sent: list[list[list[int]]] = []
    rates = iter([900.0, 1000.0, 700.0])

    def run(llm: object, prompts: list[list[int]], lens: list[int], floor: object) -> dict[str, float]:
        sent.append(prompts)
        return {"output_tok_s": next(rates)}

    monkeypatch.setattr(gpu, "run_inferd_workload", run)
    monkeypatch.setattr(gpu, "generation_floor_s", lambda *args: 1.0)
    shape_run = object.__new__(gpu.ShapeRun)
    shape_run.plan, shape_run.shape, shape_run.ceilings = plan, None, None
    measured = shape_run._workload(object(), again=True)
    assert len(sent) == gpu.WORKLOAD_RUNS == 3
    first = sent[0]
    for shift, prompts in enumerate(sent):
        assert prompts == [[(t + shift) % plan.token_id_limit for t in prompt] for prompt in first]
    firsts = {prompts[0][0] for prompts in sent}
    assert len(firsts) == 3  # three different first tokens: no run's prompt starts another's
    assert measured["output_tok_s"] == 900.0 and measured["median_output_tok_s"] == 900.0
    assert [r["output_tok_s"] for r in measured["repeat_runs"]] == [1000.0, 700.0]
    capsys.readouterr()
    ours = {**measured, "floor_tok_s": 2000.0, "fraction_of_floor": 0.45}
    gpu.print_summary({"qwen3_0.6b": {"nano_vllm_workload": {"inferd": ours}}})
    assert "same engine again: 1,000 / 700 output tok/s; median of the 3 runs 900" in capsys.readouterr().out


def test_step_times_sum_each_steps_device_time_from_its_events() -> None:
    """Device time per step is from the event recorded at its input copy (after the host built
    the inputs: its first device work) to the one after its launch; a launch that copied nothing
    has none; a run whose events cannot be read (a failed one) reports none rather than failing
    again."""
    from types import SimpleNamespace

    device_ms = iter([0.0, 3.0, 10.0, 11.5, 20.0, 21.5])  # each event's device timestamp
    recorded_at: list[str] = []

    class Event:
        def record(self) -> None:
            self.ms = next(device_ms)
            recorded_at.append("event")

        def elapsed_time(self, later: Event) -> float:
            return later.ms - self.ms

    class Buffers:
        def copy_to_device(self, num_rows: int) -> None:
            recorded_at.append("copy")

    class Runner:
        buffers = Buffers()

        def launch(self, out: object, previous: object = None) -> object:
            recorded_at.append("inputs built")
            if out.sequences:  # type: ignore[attr-defined]
                self.buffers.copy_to_device(len(out.sequences))  # type: ignore[attr-defined]
            return out

    def step(*num_tokens: int) -> SimpleNamespace:
        return SimpleNamespace(sequences=[SimpleNamespace(num_tokens=n, start_pos=4) for n in num_tokens])

    runner = Runner()
    times = gpu.StepTimes(runner, timing_event=Event)
    for out in (step(9, 1), step(), step(1, 1), step(1, 1)):
        runner.launch(out)
    groups = times.close(time.perf_counter())
    assert groups["with prompt tokens"]["device_busy_seconds"] == pytest.approx(3e-3)
    assert groups["decode <= 2"]["device_busy_seconds"] == pytest.approx(3e-3)  # the empty step: none
    assert groups["decode <= 2"]["steps"] == 3
    # The first event after the host's input work, just before the copy; the second after launch.
    assert recorded_at[:5] == ["inputs built", "event", "copy", "event", "inputs built"]
    assert "copy_to_device" not in vars(runner.buffers) and "launch" not in vars(runner)
    for group in groups.values():
        assert group["device_busy_fraction"] == pytest.approx(group["device_busy_seconds"] / group["seconds"])

    class Unreached(Event):
        def elapsed_time(self, later: Event) -> float:
            raise RuntimeError("the event has not been recorded on the device")

    device_ms = iter([0.0, 1.0])
    runner.buffers = Buffers()
    times = gpu.StepTimes(runner, timing_event=Unreached)
    runner.launch(step(1))
    assert "device_busy_seconds" not in times.close(time.perf_counter())["decode <= 2"]


def test_greedy_agreement_counts_leading_matches_and_compares_their_logprobs() -> None:
    reference = [([1, 2, 3, 4], [-0.1, -0.2, -0.3, -0.4]), ([5, 6, 7, 8], [-1.0] * 4),
                 ([9, 9, 9, 9], [0.0] * 4)]  # fmt: skip
    run = [([1, 2, 3, 4], [-0.1, -0.25, -0.3, -0.4]), ([5, 0, 7, 8], [-1.5, -9.0, -1.0, -1.0]),
           ([0, 9, 9, 9], [-7.0] * 4)]  # fmt: skip
    agreement = gpu.greedy_agreement(run, reference)
    # After the first difference the rest of a prompt counts as different, matches or not, and
    # its log-probabilities are not compared (they are of other tokens).
    assert agreement["same_prefix"] == [4, 1, 0] and agreement["same_fraction"] == 5 / 12
    assert agreement["logprob_max_diff"] == pytest.approx(0.5)
    assert gpu.greedy_agreement(reference, reference) == {
        "same_prefix": [4, 4, 4], "same_fraction": 1.0, "logprob_max_diff": 0.0,
    }  # fmt: skip
    # No token in common: no log-probabilities to compare, not a difference of 0.
    nothing = gpu.greedy_agreement([([0, 0, 0, 0], [-1.0] * 4)], reference[:1])
    assert nothing["same_fraction"] == 0.0 and nothing["logprob_max_diff"] is None
    notes = [gpu._agreement_note({"greedy_agreement": result}) for result in (nothing, agreement)]
    assert notes[0].endswith("0%, log-probabilities no token in common")
    assert notes[1].endswith("42%, log-probabilities within 0.500")


def test_a_variants_greedy_run_is_compared_with_the_default_engines(tiny_model_factory) -> None:
    """As gpu.py runs it: each engine built anew with random weights, within the smoke plan's
    context (prompts capped at its prompt length). An engine of the same options agrees on every
    token and log-probability; one whose layers compute something else does not."""
    from argparse import Namespace

    folder = tiny_model_factory("qwen3")
    run = object.__new__(gpu.ShapeRun)
    run.plan = gpu.Plan("cpu", torch.float32, 3, 24, 6, 8, 100, "4MiB")
    run.reference_tokens = None
    run.args = Namespace(smoke=True)
    assert run._agreement(gpu.inferd_engine(folder, run.plan, "torch", {}), reference=False) == {
        "skipped": "no reference: the default engine's greedy run is missing"
    }
    default = gpu.inferd_engine(folder, run.plan, "torch", {})
    assert run._agreement(default, reference=True) == {"reference": True, "prompts": 3}  # 2 together, 1 alone
    assert run.reference_tokens is not None
    assert all(len(tokens) == len(logprobs) == 6 for tokens, logprobs in run.reference_tokens)
    torch.randn(100)  # whatever ran in between, the next engine's random weights are the same
    same = run._agreement(gpu.inferd_engine(folder, run.plan, "torch", {}), reference=False)
    assert same["same_fraction"] == 1.0 and same["logprob_max_diff"] == 0.0
    broken = gpu.inferd_engine(folder, run.plan, "torch", {})
    with torch.no_grad():
        for name, param in broken.engine.core.runner.model.named_parameters():
            if "down_proj" in name:
                param.mul_(-1.0)
    differs = run._agreement(broken, reference=False)
    assert differs["same_fraction"] < 0.5, differs


def test_checkpoint_variants_run_random_weights_in_their_layout(tiny_model_factory, tmp_path) -> None:
    """The ``awq`` variant's engine holds 4-bit words with zero points, as an AWQ checkpoint's; the
    other variants run on the shape's own folder."""
    import json

    run = object.__new__(gpu.ShapeRun)
    run.hf_config = json.loads((tiny_model_factory("qwen3") / "config.json").read_text())
    run.folder = gpu.write_model_folder(tmp_path / "qwen3", run.hf_config)
    assert run.variant_folder("fp8") == run.folder
    plan = gpu.Plan("cpu", torch.float32, 3, 24, 6, 8, 100, "4MiB")
    llm = gpu.inferd_engine(run.variant_folder("awq"), plan, "torch", gpu.VARIANTS["awq"])
    down = llm.engine.core.runner.model.model.layers[0].mlp.down_proj
    assert down.weight.dtype == torch.int32 and "weight_zero_point" in down._parameters
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))[0].token_ids


def test_kernel_compiles_are_logged_through_tritons_hooks_and_the_hooks_restored() -> None:
    from types import SimpleNamespace

    from triton import knobs

    before = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
    with gpu.KernelCompiles() as compiles:
        for name in ("_decode", "_decode", "_extend"):
            hooks = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
            # A hook that returns a true value would make Triton skip the compile.
            assert not hooks[0](key=(name, 1), repr=f"{name}[num_warps=4]()", fn=SimpleNamespace(name=name))
            hooks[1](key=(name, 1), repr=f"{name}[num_warps=4]()", fn=SimpleNamespace(name=name))
    assert (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook) == before
    summary = compiles.summary()
    assert summary["count"] == 3 and summary["kernels"] == ["_decode", "_extend"] and summary["seconds"] >= 0


def test_module_patches_hold_for_the_block_only() -> None:
    """A variant's kernel constant is set while it is measured and restored after, failure or not."""
    from inferd.attention import triton_kernels

    default = triton_kernels._MIN_TOKENS_PER_SPLIT
    patches = gpu.MODULE_PATCHES["split_32"]
    from inferd.worker.cuda_graphs import context_tiers

    def one_sequence_tiers() -> list[tuple[int, int]]:
        """(longest context, split) of the graphs of one sequence on an H200, Qwen3's 8 KV heads."""
        tiers = context_tiers(2048, lambda c: triton_kernels.default_num_splits(1, 8, c, 132),
                              triton_kernels.longest_unsplit_context())  # fmt: skip
        return [(tier, triton_kernels.default_num_splits(1, 8, tier, 132)) for tier in tiers]

    with gpu.patched_modules(patches):
        assert triton_kernels._MIN_TOKENS_PER_SPLIT == 32
        assert one_sequence_tiers()[:3] == [(63, 1), (127, 3), (255, 7)]
    assert triton_kernels._MIN_TOKENS_PER_SPLIT == default
    assert one_sequence_tiers()[:3] == [(127, 1), (255, 3), (511, 7)]
    with pytest.raises(RuntimeError), gpu.patched_modules(patches):
        raise RuntimeError("the measurement failed")
    assert triton_kernels._MIN_TOKENS_PER_SPLIT == default


def test_every_patch_names_a_constant_and_all_unmeasured_takes_every_feature() -> None:
    """A misspelt patch would raise outside any part's ``attempt`` and end the device call; a
    feature left out of all_unmeasured would be missing from the figures the defaults would give;
    a patch or option equal to the default would measure the default again."""
    import importlib

    from inferd.config import GPU_DEFAULTS

    for patches in gpu.MODULE_PATCHES.values():
        for (module, attr), value in patches.items():
            assert getattr(importlib.import_module(module), attr) != value, f"{module}.{attr}"
    # An option timed by a part of its own (the sampler's: test_gpu_benchmark_sweep.py checks its
    # "triton_penalized" entry) is left out of the engine variants.
    assert all(not GPU_DEFAULTS[option] for option in gpu.MEASURED_IN_PARTS)
    off = {option for option, on in GPU_DEFAULTS.items() if not on} - set(gpu.MEASURED_IN_PARTS)
    assert gpu.VARIANTS["all_unmeasured"] == dict.fromkeys(off, True)
    for option in off:  # each also alone
        assert any(options == {option: True} for options in gpu.VARIANTS.values()), option
    on = {option for option, on in GPU_DEFAULTS.items() if on}
    assert gpu.VARIANTS["previous_defaults"] == dict.fromkeys(on, False)


def test_mid_size_batches_split_their_long_contexts() -> None:
    """Batches of up to 65 sequences split their long contexts on an H200 (4 decode programs per
    SM); before the H200 call that measured it (previous_defaults), only batches of up to 16 did."""
    from inferd.attention import triton_kernels
    from inferd.worker.cuda_graphs import context_tiers

    def tiers(num_seqs: int) -> list[tuple[int, int]]:
        def split(context: int) -> int:
            return triton_kernels.default_num_splits(num_seqs, 8, context, 132)

        first = triton_kernels.longest_unsplit_context()
        return [(tier, split(tier)) for tier in context_tiers(2048, split, first)]

    assert tiers(32) == [(127, 1), (2048, 3)]
    assert tiers(64) == [(127, 1), (2048, 2)]
    assert tiers(72) == [(2048, 1)]
    with gpu.patched_modules(gpu.MODULE_PATCHES["previous_defaults"]):
        assert [tiers(n) for n in (32, 64, 72)] == [[(2048, 1)]] * 3


def test_host_only_timing_stops_before_waiting_for_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait for the device counts in the full time, not in the host's."""
    clock = iter([0.0, 3.0, 10.0])  # start, after the calls, after the wait
    monkeypatch.setattr(gpu.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(gpu.torch.cuda, "synchronize", lambda: None)
    assert gpu._timed(lambda: None, "cuda", 3, host_only=True) == 1.0
    clock = iter([0.0, 3.0, 9.0])
    assert gpu._timed(lambda: None, "cuda", 3) == 3.0


def test_the_smoke_run_asks_for_the_gpus_defaults_a_cpu_engine_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    from inferd import config

    monkeypatch.setattr(
        config, "GPU_DEFAULTS", {"triton_sampling": True, "triton_pdl": True, "triton_tiled_linear": False}
    )
    options = gpu.smoke_options()
    assert options["triton_sampling"] is True and options["triton_ops"] is True
    assert "triton_pdl" not in options and "triton_tiled_linear" not in options  # refused on a CPU; off


def test_variants_are_printed_against_the_default() -> None:
    assert gpu._against(1050.0, 1000.0) == " (+5.0% against the default)"
    assert gpu._against(900.0, 1000.0) == " (-10.0% against the default)"
    assert gpu._against(900.0, None) == ""


def test_a_variant_leaves_pdl_off_for_the_sweeps_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweeps call kernels directly after the variants: PDL, which an engine switches on for
    the whole process, must be off again whether the variant's measurement ended well or not."""
    from argparse import Namespace

    from inferd.layers import triton_pdl

    run = object.__new__(gpu.ShapeRun)
    run.args, run.base_options, run.result = Namespace(smoke=False), {}, {"variants": {}}
    measured: list[dict[str, object]] = []

    def measure(
        _: object, entry: object, key: str, options: dict[str, object], *rest: object, **keywords: object
    ) -> None:
        measured.append(options)
        monkeypatch.setattr(triton_pdl, "_enabled", True)  # as the engine sets it
        if len(measured) == 2:
            raise RuntimeError("the measurement failed")

    monkeypatch.setattr(gpu.ShapeRun, "_measure", measure, raising=True)
    run.variant("fused_linear")
    assert measured[0]["triton_fused_linear"] is True and not triton_pdl.enabled()
    with pytest.raises(RuntimeError):
        run.variant("pdl_prefetch")
    assert not triton_pdl.enabled()


class Recorder:
    """Fake benchmark steps that note what ran, in which process, and what they found."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.ran: list[str] = []
        self.references: list[object] = []
        self.children: list[list[str]] = []

    def steps(self, runs: dict[str, gpu.ShapeRun]) -> list:
        return [functools.partial(self.record, runs, name) for name in self.names]

    def record(self, runs: dict[str, gpu.ShapeRun], name: str) -> None:
        qwen = runs["qwen3_0.6b"]
        self.ran.append(name)
        qwen.result[name] = len(self.ran)
        if name == "first":
            qwen.reference_tokens = [([1, 2], [-0.5, -0.25])]
        self.references.append(qwen.reference_tokens)
        if name == "dies":
            raise Died

    def child(self, arguments: list[str]) -> int:
        """A child process, run in this one for the test; one that dies ends with SIGABRT."""
        self.children.append(arguments)
        self.ran.append("child")
        try:
            return gpu.main(arguments)
        except Died:
            return -6


class Died(BaseException):
    """A process's end that no Python handler sees, as an abort in torch would be."""


def test_a_lost_device_goes_on_in_a_fresh_process_from_the_next_step(tmp_path, monkeypatch) -> None:
    """A step that breaks the CUDA context costs that step only: the child saves what it measured
    and a fresh one goes on after it, with the results and the reference tokens."""
    recorder = Recorder(("first", "breaks", "after"))
    lost = [False, True, False]  # checked after each step: the second one loses the device
    monkeypatch.setattr(gpu, "planned_steps", recorder.steps)
    monkeypatch.setattr(gpu, "device_lost", lambda plan: lost.pop(0))
    monkeypatch.setattr(gpu, "run_child", recorder.child)
    out = tmp_path / "run.json"
    assert gpu.main(["--smoke", "--out", str(out)]) == 0

    assert recorder.ran == ["child", "first", "breaks", "child", "after"]
    started = ["--started-at", repr(gpu.PROCESS_STARTED_AT)]
    resume = ["--resume", str(tmp_path / "run.resume.json")]
    command = ["--smoke", "--out", str(out), "--child", *started]
    assert recorder.children == [command, [*command, *resume]]
    results = json.loads(out.read_text())
    # Each step records how many things had run before it, the children included.
    assert [results["qwen3_0.6b"][k] for k in ("first", "breaks", "after")] == [2, 3, 5]
    assert results["device_lost_in"] == [{"step": "? record breaks", "error": "the CUDA context broke"}]
    assert recorder.references[-1] == [[[1, 2], [-0.5, -0.25]]]  # through JSON into the fresh process
    assert results["qwen3_0.6b"]["nano_vllm_workload"]["transformers"] == {"skipped": "not run"}


def test_a_process_that_dies_inside_a_step_is_resumed_after_it(tmp_path, monkeypatch) -> None:
    recorder = Recorder(("first", "dies", "after"))
    monkeypatch.setattr(gpu, "planned_steps", recorder.steps)
    monkeypatch.setattr(gpu, "device_lost", lambda plan: False)
    monkeypatch.setattr(gpu, "run_child", recorder.child)
    out = tmp_path / "run.json"
    assert gpu.main(["--smoke", "--out", str(out), "--skip-transformers"]) == 0
    assert recorder.ran == ["child", "first", "dies", "child", "after"]
    results = json.loads(out.read_text())
    assert results["device_lost_in"] == [{"step": "? record dies", "error": "the process ended: signal 6"}]
    assert "dies" not in results["qwen3_0.6b"] and results["qwen3_0.6b"]["after"] == 5
    assert results["qwen3_0.6b"]["nano_vllm_workload"]["transformers"]["output_tok_s"] == 624.0


def test_a_step_whose_cleanup_fails_on_a_lost_device_still_hands_over(tmp_path, monkeypatch) -> None:
    """After a kernel fault even freeing memory raises: that must not end the run."""

    def broken() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu, "planned_steps", lambda runs: [broken, lambda: None])
    monkeypatch.setattr(gpu, "device_lost", lambda plan: True)
    args = gpu.parse_args(["--smoke", "--out", str(tmp_path / "run.json"), "--child"])
    assert gpu.run_benchmark(args) == gpu.EXIT_DEVICE_LOST
    checkpoint = gpu.Checkpoint.load(tmp_path / "run.resume.json")
    assert checkpoint.next_step == 1 and checkpoint.running is None
    assert "illegal memory access" in checkpoint.lost[0]["error"]
    assert json.loads((tmp_path / "run.partial.json").read_text())["device_lost_in"] == checkpoint.lost
    monkeypatch.setattr(gpu, "device_lost", lambda plan: False)  # a plain failure is not caught
    with pytest.raises(RuntimeError, match="illegal memory access"):
        gpu.run_benchmark(args)


def test_the_run_stops_once_the_device_is_lost_too_often(tmp_path, monkeypatch) -> None:
    recorder = Recorder(tuple(f"step{i}" for i in range(10)))
    monkeypatch.setattr(gpu, "planned_steps", recorder.steps)
    monkeypatch.setattr(gpu, "device_lost", lambda plan: True)
    monkeypatch.setattr(gpu, "run_child", recorder.child)
    out = tmp_path / "run.json"
    assert gpu.main(["--smoke", "--out", str(out)]) == 0
    # Each child loses its device in its first step; after MAX_RESUMES of them, one only writes.
    assert len(recorder.children) == gpu.MAX_RESUMES + 2
    results = json.loads(out.read_text())
    assert [lost["step"] for lost in results["device_lost_in"]] == [f"? record step{i}" for i in range(4)]
    assert "nano_vllm_workload" in results["qwen3_0.6b"]


def test_a_childs_budget_counts_from_the_command_lines_start(tmp_path, monkeypatch) -> None:
    spent: list[bool] = []
    monkeypatch.setattr(gpu, "planned_steps", lambda runs: [lambda: spent.append(gpu.BUDGET.spent())])
    for started_at in (time.time() - 1000, time.time()):
        arguments = ["--smoke", "--budget-s", "100", "--out", str(tmp_path / "run.json"), "--child"]
        assert gpu.main([*arguments, "--started-at", repr(started_at)]) == 0
    assert spent == [True, False]


def test_the_script_runs_its_benchmark_in_a_child_process(tmp_path) -> None:
    """The real processes: with no budget every part is skipped, so this takes seconds."""
    out = tmp_path / "run.json"
    typed = ["benchmarks/gpu.py", "--smoke", "--budget-s", "0", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, *typed], cwd=Path(__file__).parents[1], capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    results = json.loads(out.read_text())
    assert results["command"] == " ".join(["python", *typed])
    assert results["device_lost_in"] == []
    assert not (tmp_path / "run.resume.json").exists()  # a checkpoint only outlives a failed run


def test_steps_are_named_by_shape_and_part(tmp_path) -> None:
    args = gpu.parse_args(["--smoke", "--out", str(tmp_path / "run.json")])
    plan = gpu.Plan.for_args(args)
    runs = gpu.shape_runs(args, plan, Ceilings(bandwidth_bytes_s=1e9, matmul_flops_s=1e9), tmp_path)
    names = [gpu.step_name(step, runs) for step in gpu.planned_steps(runs)]
    assert names[:3] == ["qwen3_0.6b checks", "qwen3_0.6b variant default", "llama_3.1_8b variant default"]
    assert len(set(names)) == len(names)
    assert gpu.device_lost(plan) is False  # no CUDA context to lose on the CPU
    child = ["gpu.py", "--smoke", "--child", "--started-at", "1.5", "--out", "x.json", "--resume", "r.json"]
    assert gpu.as_typed(child) == ["gpu.py", "--smoke", "--out", "x.json"]


def test_moe_only_plans_the_mixture_of_experts_two_engines_alone(tmp_path) -> None:
    args = gpu.parse_args(["--smoke", "--moe-only", "--out", str(tmp_path / "run.json")])
    plan = gpu.Plan.for_args(args)
    runs = gpu.shape_runs(args, plan, Ceilings(bandwidth_bytes_s=1e9, matmul_flops_s=1e9), tmp_path)
    names = [gpu.step_name(step, runs) for step in gpu.planned_steps(runs)]
    assert names == ["qwen3_30b_a3b variant default", "qwen3_30b_a3b variant triton_moe"]
    # The roofline reads what one token runs through: its 8 experts of 768, not all 128.
    assert gpu.model_shape(gpu.QWEN3_30B_A3B, torch.bfloat16).intermediate_size == 8 * 768


def test_every_variant_is_planned_with_options_an_engine_takes(tmp_path, tiny_llama) -> None:
    """A variant left out of the plan is never measured; one whose options an engine refuses
    fails its part of the device call (and a misspelt option would make the fallback fail too)."""
    from inferd.engine.builder import build_engine_config

    args = gpu.parse_args(["--smoke", "--out", str(tmp_path / "run.json")])
    plan = gpu.Plan.for_args(args)
    runs = gpu.shape_runs(args, plan, Ceilings(bandwidth_bytes_s=1e9, matmul_flops_s=1e9), tmp_path)
    steps = gpu.planned_steps(runs)
    planned = {s.args[0] for s in steps if isinstance(s, functools.partial) and s.func.__name__ == "variant"}
    assert planned == set(gpu.VARIANTS)
    for options in [*gpu.VARIANTS.values(), gpu.fallback_options()]:
        on_cpu = {k: v for k, v in options.items() if k not in gpu.GPU_ONLY_OPTIONS}
        build_engine_config(tiny_llama, **{"device": "cpu", "attention_backend": "triton", "triton_ops": True,
                                           **on_cpu})  # fmt: skip


def test_a_partial_results_file_is_summarized(tmp_path, capsys) -> None:
    """A run ended by its time limit leaves only ``<out>.partial.json``: parts may be missing."""
    import gpu_summary

    def batch1(rate: float) -> dict[str, float]:
        return {"decode_tok_s": rate, "fraction_of_floor": rate / 3200, "floor_tok_s": 3200.0}

    partial = {
        "qwen3_0.6b": {"variants": {"default": {"batch1_decode": batch1(800.0)},
                                    "pdl": {"batch1_decode": batch1(900.0)}}},
        "device_lost_in": [{"step": "qwen3_0.6b variant tiled_linear", "error": "illegal address"}],
    }  # fmt: skip
    path = tmp_path / "h200.partial.json"
    path.write_text(json.dumps(partial))
    assert gpu_summary.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "device lost in qwen3_0.6b variant tiled_linear: illegal address" in out
    assert "nano-vllm workload: not measured" in out
    expected = "pdl: 900 tok/s, 28.1% of the 3,200 floor (+12.5% against the default)"
    assert expected in out
