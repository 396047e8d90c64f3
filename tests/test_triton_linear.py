"""The skinny Triton matmul (``layers/triton_linear.py``) against float64 matmuls, and the decoder's
projections routed to it for few-row inputs.

Runs through Triton's interpreter on the CPU, or compiled on a GPU with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import pytest
import torch
from matmul_checks import (
    DTYPES,
    TOLERANCE,
    check_matches_float64,
    decode_after_prompts,
    reference,
    relative_error,
)
from triton_device import DEVICE  # before triton is imported: interpreted or compiled

from inferd import LLM
from inferd.layers import triton_linear
from inferd.layers.linear import Linear
from inferd.layers.triton_linear import SkinnyTile, default_tile, skinny_linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize(
    ("out_features", "in_features", "tile"),
    [
        (40, 64, None),  # the default tile
        (37, 100, None),  # features past the last full program, inner size no tile divides
        (24, 96, SkinnyTile(block_n=4, block_k=32, num_warps=2, num_stages=3)),  # inner steps divide it
        (10, 48, SkinnyTile(block_n=16, block_k=64, num_warps=4, num_stages=2)),  # one program, one step
    ],
)
def test_skinny_linear_matches_float64(
    rows: int, out_features: int, in_features: int, tile: SkinnyTile | None, dtype: torch.dtype
) -> None:
    check_matches_float64(skinny_linear, rows, out_features, in_features, dtype, DEVICE, tile=tile)


def test_strided_rows_and_transposed_weight() -> None:
    """Rows that are a view into a wider tensor are read in place; a weight whose inner dimension
    is not contiguous is copied first."""
    generator = torch.Generator().manual_seed(3)
    wide = torch.randn(4, 160, generator=generator).to(DEVICE)
    x = wide[:, 16:112]  # row stride 160, 96 inner elements
    weight_t = torch.randn(96, 33, generator=generator).to(DEVICE)
    out = skinny_linear(x, weight_t.T)
    assert relative_error(out, reference(x, weight_t.T, None)) < TOLERANCE[torch.float32]


def test_strided_bias_is_read_in_order() -> None:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 32, generator=generator).to(DEVICE)
    weight = torch.randn(11, 32, generator=generator).to(DEVICE)
    bias = torch.randn(22, generator=generator).to(DEVICE)[::2]
    out = skinny_linear(x, weight, bias)
    assert relative_error(out, reference(x, weight, bias)) < TOLERANCE[torch.float32]


def test_rejects_what_it_cannot_compute() -> None:
    weight = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="at most"):
        skinny_linear(torch.randn(triton_linear.KERNEL_MAX_ROWS + 1, 16, device=DEVICE), weight)
    with pytest.raises(ValueError, match="must be"):
        skinny_linear(torch.randn(2, 15, device=DEVICE), weight)
    with pytest.raises(ValueError, match="bias"):
        skinny_linear(torch.randn(2, 16, device=DEVICE), weight, torch.zeros(7, device=DEVICE))
    with pytest.raises(ValueError, match="share a dtype"):
        skinny_linear(torch.randn(2, 16, device=DEVICE), weight.half())
    with pytest.raises(ValueError, match="share a dtype"):
        skinny_linear(torch.randn(2, 16, device=DEVICE), weight, torch.zeros(8, device=DEVICE).double())
    with pytest.raises(ValueError, match="floating-point"):
        skinny_linear(torch.ones(2, 16, dtype=torch.int32, device=DEVICE), weight.int())
    assert skinny_linear(torch.randn(0, 16, device=DEVICE), weight).shape == (0, 8)


def test_default_tiles() -> None:
    """The measured tile at one and two rows, shorter inner steps with more rows, and steps that
    divide the inner dimension where they can."""
    assert default_tile(1, 2048) == default_tile(2, 3072) == SkinnyTile(block_n=4, block_k=512, num_warps=4)
    assert default_tile(4, 4096).block_k == 256
    assert default_tile(8, 4096).block_k == 128
    assert default_tile(1, 384).block_k == 128  # 384 = 3 x 128
    assert default_tile(3, 100).block_k == 16  # no divisor of 16 or more: masked steps of 16
    for rows in range(1, triton_linear.KERNEL_MAX_ROWS + 1):
        tile = default_tile(rows, 1 << 14)
        assert (
            tile.block_n * tile.block_k * triton_linear.triton.next_power_of_2(rows)
            <= 32 * 32 * tile.num_warps
        )


def test_rows_routed_by_output_width() -> None:
    """One row always; two only where the output is narrow enough to starve cuBLAS."""
    assert triton_linear.rows_routed(torch.empty(1024, 3072, device="meta")) == 2
    assert triton_linear.rows_routed(torch.empty(2048, 1024, device="meta")) == 2
    assert triton_linear.rows_routed(torch.empty(2049, 1024, device="meta")) == 1
    assert triton_linear.rows_routed(torch.empty(28672, 4096, device="meta")) == 1


def test_linear_layer_sends_only_few_rows_to_triton(monkeypatch) -> None:
    layer = Linear(32, 24, bias=True).to(DEVICE)
    calls: list[int] = []
    original = triton_linear.skinny_linear

    def counted(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return original(x, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_linear, "skinny_linear", counted)
    x = torch.randn(12, 32, device=DEVICE)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    # Off by default: the same call as torch's (compared at the same row count, since a BLAS may
    # block a product of 3 rows differently from one of 12).
    assert torch.equal(layer(x[:3]), torch.nn.functional.linear(x[:3], layer.weight, layer.bias))
    assert calls == []
    layer.triton_max_rows = 2
    for rows in (1, 2, 3, 12):
        assert relative_error(layer(x[:rows]), expected[:rows].double()) < 1e-5
    assert calls == [1, 2]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_projections_use_the_skinny_matmul(tiny_model_factory, monkeypatch, arch: str) -> None:
    """A decode step of two sequences goes through it in each layer's four projections (the LM
    head stays on torch), with the torch path's logits; a prompt step of many tokens does not."""
    llm, decode, torch_logits = decode_after_prompts(tiny_model_factory(arch), [13, 13])
    core, model = llm.engine.core, llm.engine.core.runner.model

    calls: list[int] = []
    original = triton_linear.skinny_linear
    monkeypatch.setattr(
        triton_linear, "skinny_linear", lambda x, *a, **kw: calls.append(x.shape[0]) or original(x, *a, **kw)
    )
    model.enable_triton_ops(False, linear=True)
    triton_logits = core.runner.logits_for(decode)
    assert calls == [2] * 4 * llm.engine.config.model.num_layers
    assert (triton_logits - torch_logits).abs().max().item() < 1e-4

    model.enable_triton_ops(False)
    assert torch.equal(core.runner.logits_for(decode), torch_logits)


def test_engine_option_follows_triton_ops(tiny_model_factory) -> None:
    folder = tiny_model_factory("llama")
    on = LLM(folder, kv_cache_memory="4MiB", triton_ops=True)
    assert on.engine.config.uses_triton_linear
    assert on.engine.core.runner.model.model.layers[0].mlp.down_proj.triton_max_rows == 2
    assert on.engine.core.runner.model.lm_head.__class__ is torch.nn.Linear
    off = LLM(folder, kv_cache_memory="4MiB", triton_ops=True, triton_linear=False)
    assert off.engine.core.runner.model.model.layers[0].mlp.down_proj.triton_max_rows == 0
    cpu_default = LLM(folder, kv_cache_memory="4MiB", device="cpu")
    assert not cpu_default.engine.config.uses_triton_linear
