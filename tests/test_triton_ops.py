"""Triton RMSNorm / fused add + RMSNorm / rotary / SiLU-and-mul kernels against the torch layers.

Runs on the CPU through the Triton interpreter (set before triton is first imported); with
``TRITON_INTERPRET=0`` and a CUDA device the same tests check the compiled kernels.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from triton_device import DEVICE, INTERPRETED  # before triton is imported: interpreted or compiled

from inferd import LLM, SamplingParams
from inferd.config import RopeConfig
from inferd.engine.request import Request
from inferd.layers import triton_ops
from inferd.layers.activation import silu_and_mul
from inferd.layers.norm import RMSNorm
from inferd.layers.rotary import RotaryEmbedding

# The interpreter rounds bf16 differently from torch (the plain ops too), so bf16, the dtype models run
# in on a GPU, is checked only when compiled.
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])
EPS = 1e-6


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def torch_norm(size: int, dtype: torch.dtype) -> RMSNorm:
    norm = RMSNorm(size, EPS)
    with torch.no_grad():
        norm.weight.copy_(randn(size, seed=7))
    return norm.to(dtype=dtype, device=DEVICE)


def split_qkv(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> tuple:
    """q, k, v as the attention layer gets them: strided views of one fused projection output."""
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=3)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 72), (1, 64), (2, 3, 40)])
def test_rms_norm_matches_torch(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    norm = torch_norm(shape[-1], dtype)
    x = randn(*shape, dtype=dtype)
    out = triton_ops.rms_norm(x, norm.weight, EPS)
    assert out.is_contiguous()
    torch.testing.assert_close(out, norm(x))


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_strided_qk_views_per_head(dtype: torch.dtype) -> None:
    """Qwen3's q/k norm: [tokens, heads, head_dim] rows of a view split from the fused qkv."""
    q, k, _ = split_qkv(tokens=7, heads=6, kv_heads=2, head_dim=24, dtype=dtype)
    assert not q.is_contiguous() and not k.is_contiguous()
    norm = torch_norm(24, dtype)
    for view in (q, k):
        torch.testing.assert_close(triton_ops.rms_norm(view, norm.weight, EPS), norm(view))


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 72), (2, 3, 40)])
def test_fused_add_rms_norm_matches_add_then_norm(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    norm = torch_norm(shape[-1], dtype)
    x, residual = randn(*shape, dtype=dtype, seed=1), randn(*shape, dtype=dtype, seed=2)
    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = triton_ops.fused_add_rms_norm(x, residual, norm.weight, EPS)
    expected_out, expected_residual = norm(x, residual)
    torch.testing.assert_close(new_residual, expected_residual, rtol=0, atol=0)
    torch.testing.assert_close(out, expected_out)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


@torch.no_grad()
def test_fused_add_rms_norm_takes_strided_rows() -> None:
    wide = randn(5, 100)
    x, residual = wide[:, :40], randn(5, 40, seed=4)
    norm = torch_norm(40, torch.float32)
    out, new_residual = triton_ops.fused_add_rms_norm(x, residual, norm.weight, EPS)
    expected_out, expected_residual = norm(x, residual)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(new_residual, expected_residual)


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope", [RopeConfig(theta=10000.0), RopeConfig(
    theta=500000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=32), RopeConfig(
    theta=10000.0, rope_type="yarn", factor=4.0, original_max_position_embeddings=16)])  # fmt: skip
def test_rotary_on_split_views_matches_torch(dtype: torch.dtype, rope: RopeConfig) -> None:
    # 6 heads of 12 dims: neither the head count nor the half dimension is a power of two.
    q, k, v = split_qkv(tokens=9, heads=6, kv_heads=2, head_dim=12, dtype=dtype)
    v_before = v.clone()
    rotary = RotaryEmbedding(12, max_positions=64, rope=rope).to(DEVICE)
    positions = torch.tensor([0, 1, 2, 63, 5, 5, 17, 40, 3], device=DEVICE)
    expected_q, expected_k = rotary.lookup(positions).apply(q, k)
    out_q, out_k = triton_ops.apply_rotary_embedding(q, k, positions, rotary.cos, rotary.sin)
    torch.testing.assert_close(out_q, expected_q)
    torch.testing.assert_close(out_k, expected_k)
    assert torch.equal(v, v_before)  # the rest of the fused projection is untouched


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_fused_into_rotary_matches_norm_then_rotary(dtype: torch.dtype) -> None:
    q, k, _ = split_qkv(tokens=7, heads=6, kv_heads=2, head_dim=12, dtype=dtype)
    q_norm, k_norm = torch_norm(12, dtype), torch_norm(12, dtype)
    with torch.no_grad():
        k_norm.weight.mul_(0.5)  # the two norms have their own weights
    rotary = RotaryEmbedding(12, max_positions=64, rope=RopeConfig(theta=10000.0)).to(DEVICE)
    positions = torch.tensor([0, 1, 2, 63, 5, 17, 40], device=DEVICE)
    expected_q, expected_k = rotary.lookup(positions).apply(q_norm(q), k_norm(k))
    weights = (q_norm.weight, k_norm.weight, q_norm.eps)
    out_q, out_k = triton_ops.apply_rotary_embedding(q, k, positions, rotary.cos, rotary.sin, qk_norm=weights)
    torch.testing.assert_close(out_q, expected_q)
    torch.testing.assert_close(out_k, expected_k)


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_with_kv_store_equals_rotary_then_store(dtype: torch.dtype, qk_norm: bool) -> None:
    """The fused kernel writes exactly what rotary followed by the store kernel writes, into the
    same slots (scattered over blocks of 3, one padding slot -1), and leaves the rest alone."""
    from inferd.attention.triton_kernels import store_kv_cache

    q, k, v = split_qkv(tokens=6, heads=6, kv_heads=2, head_dim=12, dtype=dtype)
    v = v.view(6, 2, 12)
    norms = (torch_norm(12, dtype).weight, torch_norm(12, dtype).weight * 0.5, EPS) if qk_norm else None
    rotary = RotaryEmbedding(12, max_positions=64, rope=RopeConfig(theta=10000.0)).to(DEVICE)
    positions = torch.tensor([4, 0, 9, 63, 5, 5], device=DEVICE)
    slots = torch.tensor([7, 0, -1, 14, 3, 11], device=DEVICE)
    untouched = 7.0  # a value no write produces here
    expected_k_cache = torch.full((5, 3, 2, 12), untouched, dtype=dtype, device=DEVICE)
    expected_v_cache = expected_k_cache.clone()
    k_cache, v_cache = expected_k_cache.clone(), expected_v_cache.clone()

    expected_q, rotated_k = triton_ops.apply_rotary_embedding(q, k, positions, rotary.cos, rotary.sin, norms)
    store_kv_cache(rotated_k, v, expected_k_cache, expected_v_cache, slots)
    out_q = triton_ops.rotate_and_store_kv(
        q, k, v, positions, rotary.cos, rotary.sin, k_cache, v_cache, slots, qk_norm=norms
    )
    assert torch.equal(out_q, expected_q)
    assert torch.equal(k_cache, expected_k_cache)
    assert torch.equal(v_cache, expected_v_cache)
    written = torch.zeros(15, dtype=torch.bool)
    written[[7, 0, 14, 3, 11]] = True
    assert (k_cache.view(15, -1)[~written] == untouched).all()
    assert (k_cache.view(15, -1)[written] != untouched).all()


def test_rotary_with_kv_store_refuses_caches_that_do_not_fit() -> None:
    q, k, v = split_qkv(tokens=2, heads=4, kv_heads=2, head_dim=8, dtype=torch.float32)
    v = v.view(2, 2, 8)
    table = torch.ones(16, 4, device=DEVICE)
    positions = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    slots = torch.tensor([0, 1], device=DEVICE)
    cache = torch.zeros(2, 4, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="do not hold k"):
        narrow = cache[..., :4]
        triton_ops.rotate_and_store_kv(q, k, v, positions, table, table, narrow, narrow, slots)
    with pytest.raises(ValueError, match="one slot per token"):
        triton_ops.rotate_and_store_kv(q, k, v, positions, table, table, cache, cache.clone(), slots[:1])


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 2 * 36), (2, 3, 2 * 20), (2, 2 * 1100)])
def test_silu_and_mul_matches_torch(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gate_up = randn(*shape, dtype=dtype) * 4  # reach both tails of SiLU
    out = triton_ops.silu_and_mul(gate_up)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(out, silu_and_mul(gate_up))


def test_empty_batches_launch_nothing() -> None:
    weight = torch.ones(8, device=DEVICE)
    empty = torch.empty(0, 8, device=DEVICE)
    assert triton_ops.rms_norm(empty, weight, EPS).shape == (0, 8)
    assert triton_ops.fused_add_rms_norm(empty, empty, weight, EPS)[1].shape == (0, 8)
    assert triton_ops.silu_and_mul(empty).shape == (0, 4)
    table = torch.ones(4, 2, device=DEVICE)
    q = torch.empty(0, 2, 4, device=DEVICE)
    positions = torch.empty(0, dtype=torch.int64, device=DEVICE)
    assert triton_ops.apply_rotary_embedding(q, q, positions, table, table)[0].shape == (0, 2, 4)


def count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Wrap every wrapper of ``triton_ops`` to count how often the layers reach it."""
    calls: Counter[str] = Counter()

    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name in (
        "rms_norm",
        "fused_add_rms_norm",
        "apply_rotary_embedding",
        "rotate_and_store_kv",
        "silu_and_mul",
    ):
        monkeypatch.setattr(triton_ops, name, counted(name, getattr(triton_ops, name)))
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_model_with_triton_ops_matches_torch_path(tiny_model_factory, monkeypatch, arch: str) -> None:
    llm = LLM(tiny_model_factory(arch), kv_cache_memory="4MiB", block_size=8, attention_backend="torch")
    core = llm.engine.core
    model = core.runner.model
    vocab = llm.engine.config.model.vocab_size
    prompt = [(7 * i + 5) % vocab for i in range(13)]
    core.add_request(Request("r", prompt, SamplingParams(max_tokens=1), frozenset(), 1))
    step = core.scheduler.schedule()
    torch_logits = core.runner.logits_for(step)

    calls = count_kernel_calls(monkeypatch)
    model.enable_triton_ops(True)
    triton_logits = core.runner.logits_for(step)
    layers = llm.engine.config.model.num_layers
    assert calls["rms_norm"] == 1  # the first norm; Qwen3's q/k norms run inside the rotary kernel
    assert calls["fused_add_rms_norm"] == 2 * layers  # every later norm, the final one included
    # The rotary kernel also stores the new K/V; the attention backend only reads the cache.
    assert calls["rotate_and_store_kv"] == calls["silu_and_mul"] == layers
    assert calls["apply_rotary_embedding"] == 0
    assert (triton_logits - torch_logits).abs().max().item() < 1e-5

    model.enable_triton_ops(False)
    assert torch.equal(core.runner.logits_for(step), torch_logits)


@pytest.mark.parametrize(
    ("linear", "fused", "lengths"),
    [(False, False, (5, 11, 3)), (True, False, (5, 11)), (True, True, (5, 11))],
)
def test_greedy_decoding_with_triton_ops_is_unchanged(
    tiny_model_factory, monkeypatch, linear: bool, fused: bool, lengths: tuple[int, ...]
) -> None:
    """Prefill and decode steps of a small batch give the torch path's tokens, also with the
    skinny matmul (``layers/triton_linear.py``), which takes the decode steps of two sequences,
    and with that matmul making its inputs (the norms and SiLU-and-mul fused into it)."""
    llm = LLM(tiny_model_factory("qwen3"), kv_cache_memory="4MiB", block_size=8, attention_backend="torch")
    vocab = llm.engine.config.model.vocab_size
    prompts = [[(3 * i + j) % vocab for i in range(length)] for j, length in enumerate(lengths)]
    params = SamplingParams(max_tokens=4, temperature=0.0)
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    from inferd.layers import triton_linear

    routed: dict[str, list[int]] = {}
    for name in ("skinny_linear", "skinny_norm_linear", "skinny_silu_linear"):
        original = getattr(triton_linear, name)

        def counted(
            x: torch.Tensor, *args: object, _name: str = name, _original=original, **kwargs: object
        ) -> object:
            routed.setdefault(_name, []).append(x.shape[0])
            return _original(x, *args, **kwargs)

        monkeypatch.setattr(triton_linear, name, counted)
    llm.engine.core.runner.model.enable_triton_ops(True, linear=linear, fused_linear=fused)
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    expected_kernels = {"skinny_linear"} | ({"skinny_norm_linear", "skinny_silu_linear"} if fused else set())
    assert set(routed) == (expected_kernels if linear else set())
    assert all(set(rows) == {2} for rows in routed.values())
