"""The skinny Triton matmul over 8-bit weights, e4m3 or int8 (``layers/triton_linear.py`` with a
``WeightScale``), against the widened weights in float64, and in a model's decode step.

Runs through Triton's interpreter on the CPU, or compiled on a GPU with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import pytest
import torch
from matmul_checks import DTYPES, TOLERANCE, decode_after_prompts, reference, relative_error
from quantized_checkpoints import make_fp8_checkpoint, make_gptq_awq_checkpoint, make_int_checkpoint
from triton_device import DEVICE  # before triton is imported: interpreted or compiled

from inferd.layers import quantized, triton_linear
from inferd.layers.activation import SiluAndMul
from inferd.layers.linear_operands import WeightScale
from inferd.layers.norm import RMSNorm
from inferd.layers.triton_linear import SkinnyTile

SHAPES = [
    # (out, in, block, tile): one scale per row; whole blocks; blocks cut at both edges; a block
    # narrower than the tile's inner step, and one wider.
    (40, 64, (1, 64), None),
    (64, 128, (16, 32), None),
    (37, 100, (16, 48), None),
    (24, 96, (8, 16), SkinnyTile(block_n=4, block_k=32, num_warps=2, num_stages=3)),
    (10, 256, (4, 128), SkinnyTile(block_n=16, block_k=64, num_warps=4, num_stages=2)),
]


def _operands(
    rows: int,
    out_features: int,
    in_features: int,
    block: tuple[int, int],
    dtype: torch.dtype,
    seed: int,
    values: str = "fp8",
):
    """x, the weight as the kernel reads it, how to read it, the weight widened, and a bias.
    ``values``: "fp8", "int8" or "int4" held as e4m3 or int8; "int4-packed" packed eight to an
    int32 word; "int4-zero" and "int4-packed-zero" with a zero point per block as well."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator).to(dtype=dtype, device=DEVICE)
    # Rows of different magnitudes, so that a scale read from the wrong block shows.
    weight = torch.randn(out_features, in_features, generator=generator)
    weight *= torch.logspace(-2, 1, out_features)[:, None] * torch.logspace(0, -1, in_features)[None, :]
    kind = values.split("-")[0]
    q, scale = quantized.quantize(weight, block, kind)
    zero = None
    if values.endswith("zero"):  # values moved by a zero point per block, within 4 bits
        zero = torch.randint(-2, 3, scale.shape, generator=generator, dtype=torch.int8)
        rows_of, columns_of = (torch.arange(n) // b for n, b in zip(q.shape, block, strict=True))
        q = (q + zero[rows_of][:, columns_of]).clamp(-8, 7)
    columns = in_features if "packed" in values else None
    if columns is not None:
        q = quantized.pack_int32(q, 4)
    how = WeightScale(scale.to(DEVICE), block, None if zero is None else zero.to(DEVICE), columns)
    widened = quantized.dequantize(q.to(DEVICE), how, torch.float32)
    bias = torch.randn(out_features, generator=generator).to(dtype=dtype, device=DEVICE)
    return x, q.to(DEVICE), how, widened, bias


VALUES = ["fp8", "int8", "int4", "int4-packed", "int4-zero", "int4-packed-zero"]


@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
@pytest.mark.parametrize(("out_features", "in_features", "block", "tile"), SHAPES)
def test_scaled_weights_match_the_widened_matmul(
    rows, out_features, in_features, block, tile, dtype, values
) -> None:
    x, q, scale, widened, bias = _operands(
        rows, out_features, in_features, block, dtype, seed=rows + out_features, values=values
    )
    for b in (None, bias):
        out = triton_linear.skinny_linear(x, q, b, tile=tile, scale=scale)
        assert out.shape == (rows, out_features) and out.dtype == dtype
        assert relative_error(out, reference(x, widened, b)) < TOLERANCE[dtype]


@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize(("out_features", "in_features", "block", "tile"), SHAPES)
def test_scaled_weights_with_the_input_made_on_load(out_features, in_features, block, tile, values) -> None:
    x, q, scale, widened, bias = _operands(
        2, out_features, in_features, block, torch.float32, seed=out_features, values=values
    )
    residual = torch.randn_like(x)
    norm = RMSNorm(in_features, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        normed, _ = norm(x, residual)
        out, _ = triton_linear.skinny_norm_linear(
            x, residual, norm.weight, norm.eps, q, bias, tile=tile, scale=scale
        )
    assert relative_error(out, reference(normed, widened, bias)) < 1e-5
    gate_up = torch.randn(2, 2 * in_features, device=DEVICE)
    out = triton_linear.skinny_silu_linear(gate_up, q, None, tile=tile, scale=scale)
    assert relative_error(out, reference(SiluAndMul()(gate_up), widened, None)) < 1e-5


def test_scales_that_do_not_fit_the_weight_are_refused() -> None:
    x, q, scale, widened, _ = _operands(1, 40, 64, (16, 32), torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"must be float32 \(3, 2\)"):
        triton_linear.skinny_linear(x, q, None, scale=WeightScale(scale.scale[:2], (16, 32)))
    with pytest.raises(ValueError, match="must be torch.float8_e4m3fn or torch.int8"):
        triton_linear.skinny_linear(x, widened, None, scale=scale)
    with pytest.raises(ValueError, match="must share a dtype"):
        triton_linear.skinny_linear(x, q, None)  # an 8-bit weight without its scales
    x, words, packed, _, _ = _operands(1, 40, 64, (1, 32), torch.float32, seed=0, values="int4-packed-zero")
    with pytest.raises(ValueError, match="a packed weight of 72 columns has 9 words a row, not 8"):
        triton_linear.skinny_linear(
            torch.zeros(1, 72), words, None, scale=WeightScale(packed.scale, (1, 32), None, 72)
        )
    with pytest.raises(ValueError, match=r"the zero points must be int8 \(40, 2\)"):
        bad_zero = WeightScale(packed.scale, (1, 32), packed.zero_point.to(torch.int32), 64)
        triton_linear.skinny_linear(x, words, None, scale=bad_zero)


@pytest.mark.parametrize(
    ("layout", "fused"),
    [
        ("fp8", False),
        ("fp8", True),
        ("w4a16", False),
        ("w4a16", True),
        ("awq", False),
        ("gptq-int8", False),
        ("gptq-int4-act-order", True),
    ],  # fmt: skip
)
def test_model_decode_step_over_scaled_weights(
    tiny_model_factory, tmp_path, monkeypatch, layout, fused
) -> None:
    """A decode step of two sequences of an 8-bit float or a 4-bit integer checkpoint (AWQ's with
    zero points too, and GPTQ's 8-bit integers) sends every projection to the kernel with its
    scales, with the torch path's logits (the weights widened first). A GPTQ checkpoint in
    activation order reorders each projection's input first, so none makes its input on load."""
    if layout == "fp8":
        folder = make_fp8_checkpoint(
            tiny_model_factory("qwen3"), tmp_path / "m", "fp8-block", block_size=(16, 48)
        )
    elif layout == "w4a16":
        folder = make_int_checkpoint(tiny_model_factory("qwen3"), tmp_path / "m", "ct-w4a16")
    else:
        folder = make_gptq_awq_checkpoint(tiny_model_factory("qwen3"), tmp_path / "m", layout, tmp_path / "w")
    llm, decode, torch_logits = decode_after_prompts(folder, [13, 9])
    scaled: list[bool] = []
    kernels: set[str] = set()
    for name in ("skinny_linear", "skinny_norm_linear", "skinny_silu_linear"):
        original = getattr(triton_linear, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            scaled.append(kwargs.get("scale") is not None)
            kernels.add(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(triton_linear, name, counted)
    llm.engine.core.runner.model.enable_triton_ops(False, linear=True, fused_linear=fused)
    triton_logits = llm.engine.core.runner.logits_for(decode)
    assert scaled == [True] * 4 * llm.engine.config.model.num_layers
    if fused and "act-order" not in layout:
        assert {"skinny_norm_linear", "skinny_silu_linear"} <= kernels
    else:
        assert kernels == {"skinny_linear"}
    assert (triton_logits - torch_logits).abs().max().item() < 1e-4
