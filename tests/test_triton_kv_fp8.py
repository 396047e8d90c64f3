"""The Triton kernels over an 8-bit float KV cache (``attention/triton_kv_dtype.py``): what the
store, rotary-with-store and decode-rotary kernels write, and attention over the rounded keys
and values, against the PyTorch backend and a reference that reads the cache as stored.

Runs on the CPU through the Triton interpreter; with ``TRITON_INTERPRET=0`` and a CUDA device the
same tests check the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch
from test_kv_cache_scales import with_kv_scales
from test_triton_attention import make_batch, reference_attention
from test_triton_decode_rotary import DecodeStep
from triton_device import DEVICE, INTERPRETED  # before triton is imported: interpreted or compiled

from inferd import LLM, SamplingParams
from inferd.attention import triton_kernels
from inferd.attention.kv_dtype import FP8_KV_DTYPE, to_cache
from inferd.attention.torch_backend import TorchAttentionBackend
from inferd.attention.triton_backend import TritonAttentionBackend
from inferd.layers import triton_ops

TOLERANCE = 2e-5 if INTERPRETED else 1e-2


def _fp8_batch(context_lens: list[int], query_lens: list[int], seed: int = 0):
    batch = make_batch(context_lens, query_lens, 16, 8, 2, 64, seed=seed)
    batch.k_cache, batch.v_cache = (
        to_cache(batch.k_cache, FP8_KV_DTYPE),
        to_cache(batch.v_cache, FP8_KV_DTYPE),
    )
    # Keys past e4m3's range: stored clamped, never as NaN.
    batch.k[0, 0, :4] = torch.tensor([600.0, -900.0, 1e6, -448.5])
    return batch


@pytest.mark.parametrize(
    ("context_lens", "query_lens"),
    [([9, 200, 0], [1, 1, 1]), ([0, 48, 150], [25, 16, 1]), ([0, 33], [40, 3])],
)
def test_both_backends_store_rounded_keys_and_attend_over_them(context_lens, query_lens) -> None:
    batches = [_fp8_batch(context_lens, query_lens) for _ in range(2)]
    outputs = [
        backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, b.scale)
        for backend, b in zip((TritonAttentionBackend(), TorchAttentionBackend()), batches, strict=True)
    ]
    triton_batch, torch_batch = batches
    # Both stored each new key and value as to_cache makes them, bit for bit.
    assert torch.equal(triton_batch.k_cache.view(torch.uint8), torch_batch.k_cache.view(torch.uint8))
    assert torch.equal(triton_batch.v_cache.view(torch.uint8), torch_batch.v_cache.view(torch.uint8))
    slots = triton_batch.meta.slot_mapping.long()
    stored = triton_batch.k_cache.view(-1, 2, 64)[slots]
    assert torch.equal(stored.view(torch.uint8), to_cache(triton_batch.k, FP8_KV_DTYPE).view(torch.uint8))
    assert stored[0, 0, :4].float().tolist() == [448.0, -448.0, 448.0, -448.0]
    # Both attend over the cache as stored, new tokens included (a fresh prompt too).
    expected = reference_attention(triton_batch)
    for out in outputs:
        assert not out.isnan().any()
        torch.testing.assert_close(out.float(), expected, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_store_rounds_as_torch_casts_at_every_magnitude(dtype: torch.dtype) -> None:
    """e4m3's normal and subnormal values, ties, values that round up into the next power of two,
    signed zeros and values past its range: all stored as ``to_cache`` (torch's cast) stores them."""
    gen = torch.Generator().manual_seed(3)
    tokens, heads, dim = 64, 2, 64
    magnitudes = torch.logspace(-5, 3, tokens * heads * dim)[
        torch.randperm(tokens * heads * dim, generator=gen)
    ]
    k = (torch.randn(tokens * heads * dim, generator=gen) * magnitudes).view(tokens, heads, dim)
    # Ties, a round-up into the next power of two, and values that are no numbers.
    k[0, 0, :9] = torch.tensor([-0.0, 0.0, 1.0625, 0.4861, 2.0**-9 * 1.5, 2.0**-10 * 3, float("nan"),
                                float("inf"), -float("inf")])  # fmt: skip
    k = k.to(dtype).to(DEVICE)
    k_cache = torch.zeros(tokens // 8, 8, heads, dim, dtype=FP8_KV_DTYPE, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(tokens, generator=gen).to(DEVICE)
    triton_kernels.store_kv_cache(k, k, k_cache, v_cache, slots)
    expected = to_cache(k, FP8_KV_DTYPE)
    stored = k_cache.view(tokens, heads, dim)[slots]
    numbers = ~expected.float().isnan()
    assert torch.equal(stored.view(torch.uint8)[numbers], expected.view(torch.uint8)[numbers])
    assert stored.float()[~numbers].isnan().all() and int((~numbers).sum()) == 1  # NaN's sign aside
    assert stored[0, 0, 7:9].float().tolist() == [448.0, -448.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_with_its_own_rotary_stores_and_reads_what_the_two_kernels_do(
    num_splits, normed, dtype
) -> None:
    """The decode kernel that rotates and stores the new token itself folds it in as stored
    (rounded), as the rotary kernel and the decode kernel after it read it back; both store the
    rotated key rounded to the model's dtype and then to e4m3, as the torch path does."""
    step = DecodeStep([0, 16, 63, 130], 16, 4, 2, 32, dtype)
    step.k_cache, step.v_cache = to_cache(step.k_cache, FP8_KV_DTYPE), to_cache(step.v_cache, FP8_KV_DTYPE)
    expected, k_expected, v_expected = step.unfused(num_splits, normed)
    out, k_cache, v_cache = step.fused(num_splits, normed)
    assert torch.equal(v_cache.view(torch.uint8), v_expected.view(torch.uint8))
    assert torch.equal(k_cache.view(torch.uint8), k_expected.view(torch.uint8))
    tolerance = TOLERANCE if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)
    plain = DecodeStep([0, 16, 63, 130], 16, 4, 2, 32, dtype)
    plain_out, _, _ = plain.fused(num_splits, normed)
    assert (plain_out.float() - out.float()).abs().max().item() > 1e-2  # the cache's rounding is in the check


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_rotary_stores_keys_as_the_torch_path_does(dtype: torch.dtype) -> None:
    """The rotary kernel that stores K/V (``triton_ops``) rounds the rotated key to the model's
    dtype before the cache's, as the torch rotary followed by the store does."""
    step = DecodeStep([5, 40, 90], 16, 4, 2, 32, dtype)
    caches = [to_cache(c, FP8_KV_DTYPE) for c in (step.k_cache, step.v_cache)]
    fused_k, fused_v = (c.clone() for c in caches)
    triton_ops.rotate_and_store_kv(step.q, step.k, step.v, step.positions, step.cos, step.sin, fused_k,
                                   fused_v, step.slot_mapping, None)  # fmt: skip
    _, k = triton_ops.apply_rotary_embedding(step.q, step.k, step.positions, step.cos, step.sin)
    two_k, two_v = (c.clone() for c in caches)
    rows = step.slot_mapping >= 0
    triton_kernels.store_kv_cache(k[rows], step.v[rows], two_k, two_v, step.slot_mapping[rows])
    assert torch.equal(fused_k.view(torch.uint8), two_k.view(torch.uint8))
    assert torch.equal(fused_v.view(torch.uint8), two_v.view(torch.uint8))


@pytest.mark.skipif(not INTERPRETED, reason="the engine test runs the CPU engine")
@pytest.mark.parametrize("kv_scales", [False, True])
def test_greedy_tokens_equal_on_the_triton_path(tiny_model_factory, tmp_path, kv_scales: bool) -> None:
    """An 8-bit KV cache gives the same greedy tokens through the Triton kernels (attention,
    the rotary with its KV store, and the decode kernel with its own rotary) as through torch;
    also with a checkpoint's KV-cache scales, folded into the q/k norms the decode kernel applies."""
    folder = tiny_model_factory("qwen3")
    if kv_scales:
        folder = with_kv_scales(folder, tmp_path / "scaled")
    prompts = [[(7 * i + j) % 200 + 5 for i in range(n)] for j, n in enumerate((3, 19, 40))]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    options = dict(kv_cache_memory="4MiB", block_size=8, kv_cache_dtype="fp8", device="cpu")
    expected = [
        o.token_ids for o in LLM(folder, attention_backend="torch", **options).generate(prompts, params)
    ]
    for extra in ({}, {"triton_decode_rotary": True}):
        llm = LLM(folder, attention_backend="triton", triton_ops=True, **extra, **options)
        assert [o.token_ids for o in llm.generate(prompts, params)] == expected
