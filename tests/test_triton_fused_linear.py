"""The skinny matmul making its own input (``skinny_norm_linear``, ``skinny_silu_linear`` in
``layers/triton_linear.py``) against the unfused torch layers, and the decoder routing to it.

Runs through Triton's interpreter on the CPU, or compiled on a GPU with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import pytest
import torch
from matmul_checks import DTYPES, TOLERANCE, decode_after_prompts, relative_error
from triton_device import DEVICE  # before triton is imported: interpreted or compiled

from inferd import LLM
from inferd.layers import triton_linear
from inferd.layers.activation import SiluAndMul, silu_and_mul
from inferd.layers.linear import Linear
from inferd.layers.norm import RMSNorm
from inferd.layers.triton_linear import SkinnyTile, skinny_norm_linear, skinny_silu_linear

# The shared tolerances hold here too. The unfused norm rounds its output to the dtype before the
# matmul and the fused one keeps float32 there, so the norm's reference is the unrounded norm in
# float64 (against the rounded one, bfloat16's rounding of 48 inputs alone moved a 3-feature
# output by 1.2% on an H200); SiLU-and-mul rounds where the torch layer does.
SHAPES = [
    (
        40,
        64,
        None,
    ),  # the default tiles, 5 programs (one or two rows) or 10: only the first stores the residual
    (37, 100, None),  # features past the last full program, inner size no tile divides
    (24, 96, SkinnyTile(block_n=4, block_k=32, num_warps=2, num_stages=3)),  # three inner steps
    (3, 48, None),  # one program, which must store the residual itself
]


def test_the_fused_kernels_default_tile_is_the_measured_one_at_one_and_two_rows() -> None:
    """8 features a program and 512-element steps (fewer where 512 does not divide the row) at
    one and two rows, what the decoder sends; more rows keep the plain kernel's tile."""
    assert triton_linear.default_fused_tile(1, 1024) == SkinnyTile(block_n=8, block_k=512, num_warps=4)
    assert triton_linear.default_fused_tile(2, 3072) == SkinnyTile(block_n=8, block_k=512, num_warps=4)
    assert triton_linear.default_fused_tile(1, 100) == SkinnyTile(block_n=8, block_k=16, num_warps=4)
    for rows in (3, 8):
        assert triton_linear.default_fused_tile(rows, 1024) == triton_linear.default_tile(rows, 1024)


def norm_in_float64(h: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    """What the fused kernel feeds its matmul: ``h``'s RMSNorm, unrounded."""
    h = h.double()
    return h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + norm.eps) * norm.weight.double()


def operands(
    rows: int, out_features: int, in_features: int, dtype: torch.dtype, seed: int
) -> list[torch.Tensor]:
    """Input rows, a second tensor of their shape, a weight and a bias, on the test device."""
    generator = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(rows, in_features, generator=generator),
        torch.randn(rows, in_features, generator=generator),
        torch.randn(out_features, in_features, generator=generator) / in_features**0.5,
        torch.randn(out_features, generator=generator),
    ]
    return [t.to(dtype=dtype, device=DEVICE) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
@pytest.mark.parametrize(("out_features", "in_features", "tile"), SHAPES)
def test_norm_linear_matches_norm_then_linear(
    rows: int, out_features: int, in_features: int, tile: SkinnyTile | None, dtype: torch.dtype
) -> None:
    x, residual, weight, bias = operands(rows, out_features, in_features, dtype, seed=rows + out_features)
    norm = RMSNorm(in_features, eps=1e-6).to(dtype=dtype, device=DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, in_features))
        _, summed = norm(x, residual)
        for b in (None, bias):
            out, residual_out = skinny_norm_linear(x, residual, norm.weight, norm.eps, weight, b, tile=tile)
            expected = torch.nn.functional.linear(
                norm_in_float64(summed, norm), weight.double(), b.double() if b is not None else None
            )
            assert out.shape == (rows, out_features) and out.dtype == dtype
            assert relative_error(out, expected) < TOLERANCE[dtype]
            # The residual stream is the torch path's to the bit: later layers add to it.
            assert torch.equal(residual_out, summed)
            # Without a residual (the first layer), the norm is of x, and x is the stream.
            out, stream = skinny_norm_linear(x, None, norm.weight, norm.eps, weight, b, tile=tile)
            expected = torch.nn.functional.linear(
                norm_in_float64(x, norm), weight.double(), b.double() if b is not None else None
            )
            assert relative_error(out, expected) < TOLERANCE[dtype] and stream is x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
@pytest.mark.parametrize(("out_features", "in_features", "tile"), SHAPES)
def test_silu_linear_matches_silu_and_mul_then_linear(
    rows: int, out_features: int, in_features: int, tile: SkinnyTile | None, dtype: torch.dtype
) -> None:
    gate, up, weight, bias = operands(rows, out_features, in_features, dtype, seed=7 * rows + out_features)
    gate_up = torch.cat([gate, up], dim=1)
    activated = silu_and_mul(gate_up)  # rounded to the dtype, as the fused kernel rounds it too
    for b in (None, bias):
        out = skinny_silu_linear(gate_up, weight, b, tile=tile)
        expected = torch.nn.functional.linear(
            activated.double(), weight.double(), b.double() if b is not None else None
        )
        assert out.shape == (rows, out_features) and out.dtype == dtype
        assert relative_error(out, expected) < TOLERANCE[dtype]


def test_strided_inputs_are_read_in_place() -> None:
    """Rows that are views into wider tensors: the gate|up rows, and the norm's two inputs with
    row strides of their own (a view of another width, then a transposed residual, which is
    copied first)."""
    x, residual, weight, _ = operands(2, 12, 48, torch.float32, seed=11)
    wide = torch.randn(2, 200, device=DEVICE)
    gate_up = wide[:, 8:104]
    expected = torch.nn.functional.linear(silu_and_mul(gate_up.contiguous()), weight)
    assert relative_error(skinny_silu_linear(gate_up, weight), expected) < 1e-5
    norm_weight = torch.linspace(0.5, 1.5, 96, device=DEVICE)[::2]
    summed = x + residual
    normed = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_weight
    x_view = wide[:, :48].copy_(x)
    residual_views = [
        torch.randn(2, 72, device=DEVICE)[:, 10:58].copy_(residual),  # row stride 72, x's is 200
        torch.randn(48, 2, device=DEVICE).copy_(residual.T).T,  # rows not contiguous
    ]
    for residual_view in residual_views:
        out, stream = skinny_norm_linear(x_view, residual_view, norm_weight, 1e-6, weight)
        assert relative_error(out, torch.nn.functional.linear(normed, weight)) < 1e-5
        assert torch.equal(stream, summed)


def test_no_output_features_still_gives_the_residual_stream() -> None:
    x, residual = torch.randn(2, 16, device=DEVICE), torch.randn(2, 16, device=DEVICE)
    out, stream = skinny_norm_linear(
        x, residual, torch.ones(16, device=DEVICE), 1e-6, torch.empty(0, 16, device=DEVICE)
    )
    assert out.shape == (2, 0) and torch.equal(stream, x + residual)


def test_rejects_inputs_that_do_not_fit() -> None:
    weight = torch.randn(8, 16, device=DEVICE)
    norm_weight = torch.ones(16, device=DEVICE)
    x = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"\[rows, 2 \* in\]"):
        skinny_silu_linear(x, weight)
    with pytest.raises(ValueError, match="norm weight"):
        skinny_norm_linear(x, None, torch.ones(15, device=DEVICE), 1e-6, weight)
    with pytest.raises(ValueError, match="residual"):
        skinny_norm_linear(x, torch.randn(1, 16, device=DEVICE), norm_weight, 1e-6, weight)
    with pytest.raises(ValueError, match="residual"):
        skinny_norm_linear(x, x.half(), norm_weight, 1e-6, weight)
    with pytest.raises(ValueError, match="at most"):
        skinny_norm_linear(torch.randn(9, 16, device=DEVICE), None, norm_weight, 1e-6, weight)


def test_layer_fuses_only_where_its_rows_go_to_triton(monkeypatch) -> None:
    """``forward_normed`` and ``forward_gated`` give the unfused layers' results either way, and
    take the fused kernels only with ``fuse_input_ops`` and rows the matmul takes."""
    calls: list[str] = []
    for name in ("skinny_linear", "skinny_norm_linear", "skinny_silu_linear"):
        original = getattr(triton_linear, name)
        monkeypatch.setattr(
            triton_linear, name, lambda *a, _n=name, _f=original, **kw: calls.append(_n) or _f(*a, **kw)
        )
    layer = Linear(32, 24, bias=True).to(DEVICE)
    norm = RMSNorm(32, eps=1e-6).to(DEVICE)
    x, residual = torch.randn(4, 32, device=DEVICE), torch.randn(4, 32, device=DEVICE)
    gate_up = torch.randn(4, 64, device=DEVICE)
    with torch.no_grad():
        normed, summed = norm(x, residual)
        expected_normed = torch.nn.functional.linear(normed, layer.weight, layer.bias)
        expected_first = torch.nn.functional.linear(norm(x), layer.weight, layer.bias)
        expected_gated = torch.nn.functional.linear(silu_and_mul(gate_up), layer.weight, layer.bias)

        def run(rows: int) -> list[str]:
            calls.clear()
            out, stream = layer.forward_normed(x[:rows], residual[:rows], norm)
            assert relative_error(out, expected_normed[:rows]) < 1e-5 and torch.equal(stream, summed[:rows])
            out, stream = layer.forward_normed(x[:rows], None, norm)
            assert relative_error(out, expected_first[:rows]) < 1e-5 and torch.equal(stream, x[:rows])
            assert (
                relative_error(layer.forward_gated(gate_up[:rows], SiluAndMul()), expected_gated[:rows])
                < 1e-5
            )
            return list(calls)

        assert run(2) == []  # torch by default
        layer.triton_max_rows = 2
        assert run(2) == ["skinny_linear"] * 3  # routed, not fused
        layer.fuse_input_ops = True
        assert run(2) == ["skinny_norm_linear"] * 2 + ["skinny_silu_linear"]
        assert run(3) == []  # more rows than the layer routes: torch, unfused


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_model_decode_step_fuses_norms_and_silu(tiny_model_factory, monkeypatch, arch: str) -> None:
    """A decode step of one sequence takes, per layer, the two norm-fused projections, the
    SiLU-fused down projection and the plain output projection, with the torch path's logits."""
    llm, decode, torch_logits = decode_after_prompts(tiny_model_factory(arch), [11])
    core = llm.engine.core

    calls: dict[str, int] = {}
    for name in ("skinny_linear", "skinny_norm_linear", "skinny_silu_linear"):
        original = getattr(triton_linear, name)

        def counted(*args: object, _name: str = name, _original=original, **kwargs: object) -> object:
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(triton_linear, name, counted)
    core.runner.model.enable_triton_ops(False, linear=True, fused_linear=True)
    fused_logits = core.runner.logits_for(decode)
    layers = llm.engine.config.model.num_layers
    assert calls == {"skinny_norm_linear": 2 * layers, "skinny_silu_linear": layers, "skinny_linear": layers}
    assert (fused_logits - torch_logits).abs().max().item() < 1e-4


def test_engine_option_needs_the_matmul(tiny_model_factory) -> None:
    folder = tiny_model_factory("llama")
    llm = LLM(folder, kv_cache_memory="4MiB", triton_ops=True, triton_fused_linear=True)
    layer = llm.engine.core.runner.model.model.layers[0]
    assert layer.self_attn.qkv_proj.fuse_input_ops and layer.mlp.down_proj.fuse_input_ops
    assert not LLM(folder, kv_cache_memory="4MiB", triton_ops=True).engine.config.uses_triton_fused_linear
    with pytest.raises(ValueError, match="needs triton_linear"):
        LLM(folder, kv_cache_memory="4MiB", triton_ops=True, triton_linear=False, triton_fused_linear=True)
    with pytest.raises(ValueError, match="needs linear"):
        llm.engine.core.runner.model.enable_triton_ops(True, linear=False, fused_linear=True)
