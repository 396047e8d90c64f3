"""Programmatic dependent launch (``layers/triton_pdl.py``), checked through the interpreter.

The interpreter has no grid dependencies, so these tests stand recorders in for the two
grid-dependency calls (and the skinny matmul's L2 prefetch) and watch the interpreter's memory
accesses and the start of each program. With PDL on, every program of every kernel of
``KERNELS`` must call them before it reads or writes any memory, and compute exactly what it
computes with PDL off. On a GPU, ``test_triton_pdl_gpu.py`` checks the
same tokens with and without PDL through captured CUDA graphs.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from triton_device import INTERPRETED  # before triton is imported: interpreted or compiled

if not INTERPRETED:
    pytest.skip("records the interpreter's memory accesses", allow_module_level=True)

from triton.runtime import interpreter  # noqa: E402

from inferd import LLM, SamplingParams  # noqa: E402
from inferd.attention import triton_kernels  # noqa: E402
from inferd.engine.request import Request  # noqa: E402
from inferd.layers import triton_linear, triton_ops, triton_pdl, triton_tiled_linear  # noqa: E402

MEMORY_ACCESSES = ("create_load", "create_store", "create_masked_load", "create_masked_store")


class Recorder:
    """The order of grid-dependency calls, L2 prefetches and memory accesses, which kernel waited,
    and the 128-byte lines prefetched."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.waited: list[str] = []
        self.prefetched: set[int] = set()

    def prefetch(self, ptrs: Any) -> None:
        self.events.append("prefetch")
        self.prefetched |= {int(address) // 128 for address in ptrs.handle.data.flatten()}

    def launch_dependents(self) -> None:
        self.events.append("launch_dependents")

    def wait(self) -> None:
        self.events.append("wait")
        # The innermost kernel on the stack (the interpreter calls it through wrappers of its own).
        frame = sys._getframe(1)
        while not (frame.f_code.co_name.startswith("_") and frame.f_code.co_name.endswith("_kernel")):
            frame = frame.f_back
        self.waited.append(frame.f_code.co_name)

    def program(self, *grid_index: object) -> None:
        self.events.append("program")

    def take(self) -> list[str]:
        events, self.events = self.events, []
        return events


def assert_each_program_waits_first(events: list[str]) -> None:
    """Every program lets the next kernel launch and waits before any memory access, with
    nothing but L2 prefetches before; a "program" event starts each program's events."""
    programs: list[list[str]] = []
    for event in events:
        if event == "program":
            programs.append([])
        else:
            assert programs, f"{event} before any program started"
            programs[-1].append(event)
    assert programs
    for index, steps in enumerate(programs):
        assert "wait" in steps, (index, steps[:4])
        before = steps[: steps.index("wait")]
        assert before[-1:] == ["launch_dependents"], (index, steps[:4])
        assert set(before) <= {"prefetch", "launch_dependents"}, (index, steps[:4])


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    """PDL switched on as the engine would on a GPU, the grid-dependency calls recorded."""
    recorder = Recorder()
    monkeypatch.setattr(triton_pdl, "gdc_wait", recorder.wait)
    monkeypatch.setattr(triton_pdl, "gdc_launch_dependents", recorder.launch_dependents)
    # The interpreter has no inline assembly: the skinny matmul's prefetch is recorded instead.
    monkeypatch.setattr(triton_linear, "prefetch_to_l2", recorder.prefetch)
    builder = interpreter.interpreter_builder
    set_grid_index = builder.set_grid_idx

    def program_starts(*grid_index: object) -> None:
        recorder.program()
        set_grid_index(*grid_index)

    monkeypatch.setattr(builder, "set_grid_idx", program_starts)
    for name in MEMORY_ACCESSES:
        original = getattr(builder, name)

        def recorded(*args: object, _original: Callable[..., object] = original) -> object:
            recorder.events.append("memory")
            return _original(*args)

        monkeypatch.setattr(builder, name, recorded)
    monkeypatch.setattr(triton_pdl, "_enabled", True)
    yield recorder


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def decode_attention(num_splits: int) -> Callable[[], torch.Tensor]:
    """Two sequences of 40 and 70 cached keys, one query token each."""
    block_size, kv_heads, head_dim = 8, 2, 16
    k_cache = randn(20, block_size, kv_heads, head_dim, seed=1)
    v_cache = randn(20, block_size, kv_heads, head_dim)
    block_tables = torch.arange(20, dtype=torch.int32).view(2, 10)
    seq_lens = torch.tensor([40, 70], dtype=torch.int32)
    starts = torch.tensor([0, 1, 2], dtype=torch.int32)
    q = randn(2, 4, head_dim, seed=2)
    return lambda: triton_kernels.paged_decode_attention(
        q, k_cache, v_cache, block_tables, seq_lens, starts, head_dim**-0.5, num_splits
    )


def decode_rotary_attention(num_splits: int) -> Callable[[], torch.Tensor]:
    """``decode_attention``'s two sequences with their new token's q, k and v unrotated: the
    kernel normalizes and rotates them, stores k and v in the cache and attends."""
    block_size, kv_heads, head_dim = 8, 2, 16
    caches = randn(2, 20, block_size, kv_heads, head_dim, seed=1)
    block_tables = torch.arange(20, dtype=torch.int32).view(2, 10)
    seq_lens = torch.tensor([40, 70], dtype=torch.int32)
    starts = torch.tensor([0, 1, 2], dtype=torch.int32)
    positions = torch.tensor([39, 69])
    slots = torch.tensor([39, 18 * block_size + 69 % block_size])
    qkv = randn(2, (4 + 2 * kv_heads) * head_dim, seed=2)
    q, k, v = (t.view(2, -1, head_dim) for t in qkv.split([64, 32, 32], dim=-1))
    cos, sin = randn(80, head_dim // 2, seed=4), randn(80, head_dim // 2, seed=5)
    norm = (randn(head_dim, seed=6), randn(head_dim, seed=7), 1e-6)

    def run() -> torch.Tensor:
        k_cache, v_cache = caches[0].clone(), caches[1].clone()
        out = triton_kernels.paged_decode_rotary_attention(
            q, k, v, positions, cos, sin, k_cache, v_cache, slots, block_tables, seq_lens, starts, 0.25,
            num_splits, norm,
        )  # fmt: skip
        return torch.cat([out.flatten(), k_cache.flatten(), v_cache.flatten()])

    return run


def rotate_and_store() -> torch.Tensor:
    qkv = randn(3, 8 * 16, seed=3)
    q, k, v = (t.view(3, -1, 16) for t in qkv.split([64, 32, 32], dim=-1))
    cos, sin = randn(10, 8, seed=4), randn(10, 8, seed=5)
    caches = torch.zeros(2, 4, 8, 2, 16)
    positions, slots = torch.tensor([0, 5, 9]), torch.tensor([0, -1, 6])
    q_out = triton_ops.rotate_and_store_kv(q, k, v, positions, cos, sin, caches[0], caches[1], slots)
    return torch.cat([q_out.flatten(), caches.flatten()])


X, RESIDUAL, NORM_WEIGHT = randn(2, 48), randn(2, 48, seed=1), randn(48, seed=3)
WEIGHT = randn(40, 48, seed=2)
# Each op: the call, and the programs of each kernel it launches, in launch order.
LAUNCHES: dict[str, tuple[Callable[[], object], dict[str, int]]] = {
    "rms_norm": (lambda: triton_ops.rms_norm(X, NORM_WEIGHT, 1e-6), {"_rms_norm_kernel": 2}),
    "add + rms_norm": (
        lambda: triton_ops.fused_add_rms_norm(X, RESIDUAL, NORM_WEIGHT, 1e-6),
        {"_fused_add_rms_norm_kernel": 2},
    ),
    "rotary + KV store": (rotate_and_store, {"_rotary_kernel": 3}),
    "silu_and_mul": (lambda: triton_ops.silu_and_mul(randn(2, 96)), {"_silu_and_mul_kernel": 2}),
    "skinny": (lambda: triton_linear.skinny_linear(X, WEIGHT), {"_skinny_linear_kernel": 10}),
    # The fused-input tile holds 8 features a program, the plain one 4.
    "skinny + add + norm": (
        lambda: triton_linear.skinny_norm_linear(X, RESIDUAL, NORM_WEIGHT, 1e-6, WEIGHT, None),
        {"_skinny_linear_kernel": 5},
    ),
    "skinny + SiLU": (
        lambda: triton_linear.skinny_silu_linear(randn(2, 96, seed=4), WEIGHT, None),
        {"_skinny_linear_kernel": 5},
    ),
    "tiled": (lambda: triton_tiled_linear.tiled_linear(randn(20, 48), WEIGHT), {"_tiled_linear_kernel": 2}),
    "decode attention": (decode_attention(1), {"_paged_decode_kernel": 4}),
    # 2 sequences x 2 KV heads x 3 splits, then 2 sequences x 4 heads merged.
    "split decode attention": (decode_attention(3), {"_paged_decode_kernel": 12, "_merge_splits_kernel": 8}),
    "split decode attention with rotary": (
        decode_rotary_attention(3),
        {"_paged_decode_rotary_kernel": 12, "_merge_splits_kernel": 8},
    ),
}


def flat(result: object) -> torch.Tensor:
    parts = result if isinstance(result, tuple) else (result,)
    return torch.cat([t.flatten() for t in parts if isinstance(t, torch.Tensor)])


def test_launch_options_ask_for_pdl_only_when_switched_on(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not triton_pdl.enabled() and triton_pdl.launch_options() == {}
    monkeypatch.setattr(triton_pdl, "_enabled", True)
    # Both: the constexpr makes the kernel wait, the launch attribute lets it start early.
    assert triton_pdl.launch_options() == {"PDL": True, "launch_pdl": True}


@pytest.mark.parametrize("name", LAUNCHES)
def test_each_program_waits_before_any_memory_access(recorder: Recorder, name: str) -> None:
    launch, programs = LAUNCHES[name]
    triton_pdl._enabled = False
    expected = flat(launch())
    assert "wait" not in recorder.take() and recorder.waited == []  # PDL off: no grid dependency
    triton_pdl._enabled = True
    got = flat(launch())
    assert torch.equal(got, expected)
    assert_each_program_waits_first(recorder.take())
    assert recorder.waited == [kernel for kernel, count in programs.items() for _ in range(count)]


# What a prefetch of every weight up to 16 MiB, the benchmark's pdl_prefetch variant, asks for
# (the default, 0, prefetches nothing).
PREFETCH_ON = 16 * 2**20


@pytest.mark.parametrize("name", ["skinny", "skinny + add + norm"])
def test_the_skinny_matmul_prefetches_exactly_its_weight_before_the_wait(
    recorder: Recorder, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(triton_linear, "PREFETCH_MAX_BYTES", PREFETCH_ON)
    launch, programs = LAUNCHES[name]
    launch()
    events = recorder.take()
    assert events[:4] == ["program", "prefetch", "launch_dependents", "wait"]
    assert events.count("prefetch") == programs["_skinny_linear_kernel"]
    start = WEIGHT.data_ptr()
    assert recorder.prefetched == set(range(start // 128, (start + WEIGHT.nbytes - 1) // 128 + 1))


def test_the_prefetch_stays_within_a_weight_with_masked_features_and_lines(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """38 features (the last program's 4 hold 2) of 80 float32 inputs (320 bytes a row: 3 of 4
    line slots used), from a 128-byte aligned address: exactly the weight's lines."""
    monkeypatch.setattr(triton_linear, "PREFETCH_MAX_BYTES", PREFETCH_ON)
    storage = torch.empty(38 * 80 + 32)
    skip = (-storage.data_ptr() % 128) // 4
    weight = storage[skip : skip + 38 * 80].view(38, 80).copy_(randn(38, 80, seed=8))
    triton_linear.skinny_linear(randn(1, 80), weight)
    start = weight.data_ptr()
    assert recorder.prefetched == set(range(start // 128, (start + weight.nbytes - 1) // 128 + 1))


def test_no_prefetch_without_pdl_or_for_a_weight_past_the_limit(recorder: Recorder, monkeypatch) -> None:
    launch, _ = LAUNCHES["skinny"]
    monkeypatch.setattr(triton_linear, "PREFETCH_MAX_BYTES", WEIGHT.nbytes - 1)
    launch()
    assert "prefetch" not in recorder.take() and recorder.waited
    monkeypatch.setattr(triton_linear, "PREFETCH_MAX_BYTES", WEIGHT.nbytes)
    triton_pdl._enabled = False
    launch()
    assert "prefetch" not in recorder.take()


def test_kernels_lists_every_kernel_that_takes_pdl() -> None:
    """A kernel with a ``PDL`` parameter but no ``launch_options()`` at its launch, or the reverse,
    would break the rule that only kernels which wait are launched early."""
    taking = set()
    for module_name in ("inferd.layers.triton_ops", "inferd.layers.triton_linear",
                        "inferd.layers.triton_tiled_linear", "inferd.attention.triton_kernels",
                        "inferd.sample.triton_sampling"):  # fmt: skip
        module = importlib.import_module(module_name)
        kernels = [
            name
            for name, kernel in vars(module).items()
            if "PDL" in getattr(kernel, "arg_names", ()) and kernel is not triton_pdl.wait_for_previous_kernel
        ]
        taking |= {f"{module_name}:{name}" for name in kernels}
        source = inspect.getsource(module)
        launches = sum(len(re.findall(rf"\b{name}\[", source)) for name in kernels)
        assert source.count("**launch_options()") == launches, module_name
    assert taking == set(triton_pdl.KERNELS)


def test_a_decode_step_with_pdl_gives_the_same_logits(tiny_model_factory, recorder: Recorder) -> None:
    """Two sequences' decode step through the whole model, every Triton path on: bit-identical
    logits, and each of the step's kernels waited (the fused inputs' kernels included)."""
    llm = LLM(tiny_model_factory("qwen3"), kv_cache_memory="4MiB", block_size=8, attention_backend="triton",
              triton_ops=True, triton_fused_linear=True, async_scheduling=False)  # fmt: skip
    core = llm.engine.core
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for i, length in enumerate((5, 19)):
        core.add_request(Request(f"r{i}", [(3 * j + i) % 100 for j in range(length)], params, frozenset(), 3))
    triton_pdl._enabled = False
    core.step()  # the prompts
    decode = core.scheduler.schedule()
    expected = core.runner.logits_for(decode)
    assert "wait" not in recorder.take() and recorder.waited == []
    triton_pdl._enabled = True
    got = core.runner.logits_for(decode)
    assert torch.equal(got, expected)
    assert_each_program_waits_first(recorder.take())  # every program of every kernel of the step
    layers = llm.engine.config.model.num_layers
    waits = {name: recorder.waited.count(name) for name in set(recorder.waited)}
    # Per layer, the matmuls (norms and SiLU fused in), rotary per token and attention; then the
    # final add + norm, per row.
    assert waits["_rotary_kernel"] == 2 * layers, waits
    assert waits["_fused_add_rms_norm_kernel"] == 2, waits
    assert set(waits) == {"_rotary_kernel", "_paged_decode_kernel", "_skinny_linear_kernel",
                          "_fused_add_rms_norm_kernel"}  # fmt: skip


def test_engine_option(tiny_model_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_model_factory("llama")
    with pytest.raises(ValueError, match="triton_pdl launches kernels on a CUDA GPU"):
        LLM(folder, kv_cache_memory="4MiB", triton_pdl=True)
    with pytest.raises(ValueError, match="needs a CUDA GPU, not cpu"):
        triton_pdl.set_enabled(True, torch.device("cpu"))
    # An engine without the option switches off what an earlier one in the process switched on.
    monkeypatch.setattr(triton_pdl, "_enabled", True)
    LLM(folder, kv_cache_memory="4MiB", triton_ops=True)
    assert not triton_pdl.enabled()
