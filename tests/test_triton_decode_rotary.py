"""Decode attention that does its own rotary, q/k norms and KV store
(``paged_decode_rotary_attention``, engine option ``triton_decode_rotary``), against the two
kernels it replaces: the rotary kernel with the KV store, then the decode kernel.

Runs on the CPU through the Triton interpreter; with ``TRITON_INTERPRET=0`` and a CUDA device the
same tests check the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch
from triton_device import DEVICE, INTERPRETED  # before triton is imported: interpreted or compiled

from inferd import LLM, SamplingParams
from inferd.attention import triton_kernels
from inferd.engine.request import Request
from inferd.layers import triton_ops

# The new token's weight is not rounded to the cache's dtype before P @ V here, as it is in the
# tile of the decode kernel; float32 sums also run in another order.
TOLERANCE = {torch.float32: 2e-5 if INTERPRETED else 1e-2, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])
# The new k in the cache: the same float32 rotation rounded once to the cache's dtype, where a
# compiler may fuse the multiply-adds differently (one unit in the last place of a half).
K_CACHE_TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype, device=DEVICE)


class DecodeStep:
    """Sequences with ``contexts`` cached tokens each decoding one token; the last row is a
    padding row of a captured graph (no keys, slot -1). q, k and v are views of one projection."""

    def __init__(self, contexts: list[int], block_size: int, heads: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype) -> None:  # fmt: skip
        rows = len(contexts) + 1
        blocks_per_seq = max(c // block_size + 1 for c in contexts)
        num_blocks = rows * blocks_per_seq + 2
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(5))
        self.block_tables = (
            order[: rows * blocks_per_seq].view(rows, blocks_per_seq).to(torch.int32).to(DEVICE)
        )
        self.seq_lens = torch.tensor([c + 1 for c in contexts] + [0], dtype=torch.int32, device=DEVICE)
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=DEVICE)
        self.positions = torch.tensor(contexts + [0], dtype=torch.int64, device=DEVICE)
        slots = [int(self.block_tables[i, c // block_size]) * block_size + c % block_size
                 for i, c in enumerate(contexts)]  # fmt: skip
        self.slot_mapping = torch.tensor(slots + [-1], dtype=torch.int64, device=DEVICE)
        qkv = randn(rows, (heads + 2 * kv_heads) * head_dim, seed=1, dtype=dtype)
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        self.q, self.k, self.v = (t.view(rows, -1, head_dim) for t in (q, k, v))
        self.k_cache = randn(num_blocks, block_size, kv_heads, head_dim, seed=2, dtype=dtype)
        self.v_cache = randn(num_blocks, block_size, kv_heads, head_dim, seed=3, dtype=dtype)
        angles = torch.outer(torch.arange(512, dtype=torch.float32), 0.9 ** torch.arange(head_dim // 2))
        self.cos, self.sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
        self.norm = (randn(head_dim, seed=6, dtype=dtype), randn(head_dim, seed=7, dtype=dtype), 1e-6)

    def unfused(
        self, num_splits: int, normed: bool, window: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The two kernels: rotary with the KV store, then decode attention."""
        k_cache, v_cache = self.k_cache.clone(), self.v_cache.clone()
        q = triton_ops.rotate_and_store_kv(
            self.q, self.k, self.v, self.positions, self.cos, self.sin, k_cache, v_cache, self.slot_mapping,
            self.norm if normed else None,
        )  # fmt: skip
        out = triton_kernels.paged_decode_attention(q, k_cache, v_cache, self.block_tables, self.seq_lens,
                                                    self.query_start_loc, 0.125, num_splits,
                                                    window=window)  # fmt: skip
        return out, k_cache, v_cache

    def fused(
        self, num_splits: int, normed: bool, window: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k_cache, v_cache = self.k_cache.clone(), self.v_cache.clone()
        out = triton_kernels.paged_decode_rotary_attention(
            self.q, self.k, self.v, self.positions, self.cos, self.sin, k_cache, v_cache, self.slot_mapping,
            self.block_tables, self.seq_lens, self.query_start_loc, 0.125, num_splits,
            self.norm if normed else None, window,
        )  # fmt: skip
        return out, k_cache, v_cache


# (contexts, block_size, heads, kv_heads, head_dim): ragged contexts across block and tile
# edges (0 cached tokens: the new one alone), GQA ratios 1 to 4, a block size that is no power of
# 2, and head sizes that are not either (the rotation's halves then do not split the padded row).
CASES = [
    ([0, 16, 63, 130], 16, 4, 2, 32),
    ([5, 64, 200], 8, 8, 2, 64),
    ([1, 47], 12, 2, 2, 32),
    ([3, 64, 100], 16, 6, 2, 80),
    ([9, 70], 8, 2, 1, 96),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize(("contexts", "block_size", "heads", "kv_heads", "head_dim"), CASES)
def test_matches_rotary_then_decode_attention(
    contexts: list[int], block_size: int, heads: int, kv_heads: int, head_dim: int, num_splits: int,
    normed: bool, dtype: torch.dtype,
) -> None:  # fmt: skip
    step = DecodeStep(contexts, block_size, heads, kv_heads, head_dim, dtype)
    expected, k_expected, v_expected = step.unfused(num_splits, normed)
    out, k_cache, v_cache = step.fused(num_splits, normed)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))  # the padding row: no keys, zeros
    # The new tokens' K/V in their slots as the rotary kernel stores them; nothing else written.
    assert torch.equal(v_cache, v_expected)
    k_tolerance = K_CACHE_TOLERANCE[dtype]
    torch.testing.assert_close(k_cache, k_expected, atol=k_tolerance, rtol=k_tolerance)
    changed = (k_cache != step.k_cache).any(dim=(2, 3)).flatten().nonzero().flatten()
    assert changed.tolist() == sorted(step.slot_mapping[:-1].tolist())


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [1, 20])
def test_a_sliding_window_matches_rotary_then_decode_attention(num_splits: int, window: int) -> None:
    """The new token folded in from registers is always inside the window; the cached ones before
    it only where they are."""
    step = DecodeStep([0, 16, 63, 130], 16, 4, 2, 32, torch.float32)
    expected, _, _ = step.unfused(num_splits, True, window)
    out, _, _ = step.fused(num_splits, True, window)
    torch.testing.assert_close(out, expected, atol=TOLERANCE[torch.float32], rtol=TOLERANCE[torch.float32])
    assert (out - step.fused(num_splits, True)[0]).abs().max() > 1e-3  # the window acts


def test_launched_heads_first_gives_the_same_results(monkeypatch) -> None:
    step = DecodeStep([0, 16, 63, 130], 16, 4, 2, 32, torch.float32)
    monkeypatch.setattr(triton_kernels, "_DECODE_HEADS_FIRST", False)
    sequence_first = step.fused(3, normed=True)
    monkeypatch.setattr(triton_kernels, "_DECODE_HEADS_FIRST", True)
    for got, expected in zip(step.fused(3, normed=True), sequence_first, strict=True):
        assert torch.equal(got, expected)


def test_a_negative_slot_stores_nothing() -> None:
    """A row with keys but slot -1 (a captured graph's padding row keeps its slot at -1) attends
    but writes no K/V: only the other rows' slots change."""
    step = DecodeStep([10, 33, 70], 8, 4, 2, 32, torch.float32)
    step.slot_mapping[1] = -1
    _, k_cache, v_cache = step.fused(3, normed=True)
    for cache, before in ((k_cache, step.k_cache), (v_cache, step.v_cache)):
        changed = (cache != before).any(dim=(2, 3)).flatten().nonzero().flatten()
        assert changed.tolist() == sorted(int(step.slot_mapping[i]) for i in (0, 2))


def test_rejects_rows_or_norm_weights_that_do_not_fit() -> None:
    step = DecodeStep([3], 8, 2, 2, 32, torch.float32)
    common = (step.positions, step.cos, step.sin, step.k_cache, step.v_cache, step.slot_mapping,
              step.block_tables, step.seq_lens, step.query_start_loc, 0.125, 1)  # fmt: skip
    with pytest.raises(ValueError, match="do not fit"):
        triton_kernels.paged_decode_rotary_attention(step.q, step.k[:, :1], step.v, *common)
    q_weight, k_weight, eps = step.norm
    with pytest.raises(ValueError, match="norm weights"):
        triton_kernels.paged_decode_rotary_attention(
            step.q, step.k, step.v, *common, (q_weight[:16], k_weight, eps)
        )


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_a_model_decode_step_gives_the_two_kernel_logits(tiny_model_factory, monkeypatch, arch: str) -> None:
    """Three sequences' decode step through the whole model, with and without the option: the
    rotary kernel no longer runs, the logits agree and the next step sees the same cache."""
    # float32 on a GPU too: compiled, the cached keys' scores are TF32 dots in both paths and the
    # new token's a float32 sum here.
    # Eager: on a GPU a captured graph would replay the decode step without calling the kernels'
    # Python launchers, which count the rotary calls.
    options = dict(kv_cache_memory="4MiB", block_size=8, attention_backend="triton", triton_ops=True,
                   async_scheduling=False, device=DEVICE.type, dtype="float32",
                   enforce_eager=True)  # fmt: skip
    folder = tiny_model_factory(arch)
    logits, caches = [], []
    rotary_calls: list[int] = []
    original = triton_ops.rotate_and_store_kv

    def counted(*args: object, **kwargs: object) -> object:
        rotary_calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_ops, "rotate_and_store_kv", counted)
    for decode_rotary in (False, True):
        llm = LLM(folder, triton_decode_rotary=decode_rotary, **options)
        core = llm.engine.core
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        for i, length in enumerate((4, 9, 21)):
            prompt = [(5 * j + i) % 100 for j in range(length)]
            core.add_request(Request(f"r{i}", prompt, params, frozenset(), 3))
        core.step()  # the prompts: the extend path either way
        decode = core.scheduler.schedule()
        rotary_calls.clear()
        logits.append(core.runner.logits_for(decode))
        assert bool(rotary_calls) is not decode_rotary
        caches.append([t.clone() for t in core.runner.kv_caches[0]])
    assert (logits[1] - logits[0]).abs().max().item() < (1e-4 if INTERPRETED else 2e-3)
    for fused, unfused in zip(caches[1], caches[0], strict=True):
        torch.testing.assert_close(fused, unfused, atol=1e-6, rtol=1e-6)


def test_engine_option_needs_the_triton_rotary_and_attention(tiny_model_factory) -> None:
    folder = tiny_model_factory("llama")
    llm = LLM(folder, kv_cache_memory="4MiB", attention_backend="triton", triton_ops=True,
              triton_decode_rotary=True)  # fmt: skip
    assert llm.engine.core.runner.model.rotary.in_decode_attention
    # Each need left out by name: on a GPU both are on by default.
    for options in ({"triton_ops": True, "attention_backend": "torch"},
                    {"attention_backend": "triton", "triton_ops": False}):  # fmt: skip
        with pytest.raises(ValueError, match="needs triton_ops and the triton attention backend"):
            LLM(folder, kv_cache_memory="4MiB", triton_decode_rotary=True, **options)
