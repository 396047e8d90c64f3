"""The tensor-core Triton matmul (``layers/triton_tiled_linear.py``) against float64 matmuls, and
the decoder's wide projections routed to it for steps of a few dozen rows.

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
from inferd.layers import triton_linear, triton_tiled_linear
from inferd.layers.linear import Linear
from inferd.layers.triton_tiled_linear import TiledTile, default_tile, tiled_linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 16, 40, 70])
@pytest.mark.parametrize(
    ("out_features", "in_features", "tile"),
    [
        (40, 256, None),  # the default tile: features past the last full program, two inner steps
        (37, 100, None),  # an inner size no step divides: masked steps
        (48, 96, TiledTile(block_m=16, block_n=16, block_k=32, num_warps=2, num_stages=3)),  # many programs
    ],
)
def test_tiled_linear_matches_float64(
    rows: int, out_features: int, in_features: int, tile: TiledTile | None, dtype: torch.dtype
) -> None:
    check_matches_float64(tiled_linear, rows, out_features, in_features, dtype, DEVICE, tile=tile)


def test_strided_inputs() -> None:
    """Rows that are a view into a wider tensor are read in place; a transposed weight and a
    strided bias are copied first."""
    generator = torch.Generator().manual_seed(3)
    wide = torch.randn(20, 160, generator=generator).to(DEVICE)
    x = wide[:, 16:112]
    weight_t = torch.randn(96, 33, generator=generator).to(DEVICE)
    bias = torch.randn(66, generator=generator).to(DEVICE)[::2]
    out = tiled_linear(x, weight_t.T, bias)
    assert relative_error(out, reference(x, weight_t.T, bias)) < TOLERANCE[torch.float32]


def test_rejects_what_it_cannot_compute() -> None:
    weight = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="must be"):
        tiled_linear(torch.randn(2, 15, device=DEVICE), weight)
    with pytest.raises(ValueError, match="bias"):
        tiled_linear(torch.randn(2, 16, device=DEVICE), weight, torch.zeros(7, device=DEVICE))
    with pytest.raises(ValueError, match="share a dtype"):
        tiled_linear(torch.randn(2, 16, device=DEVICE), weight.half())
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        tiled_linear(torch.randn(2, 16, device=DEVICE).double(), weight.double())
    assert tiled_linear(torch.randn(0, 16, device=DEVICE), weight).shape == (0, 8)


def test_default_tiles_and_routing() -> None:
    assert default_tile(1) == default_tile(16) == TiledTile(block_m=16, block_n=32, block_k=128)
    assert default_tile(17).block_m == 32 and default_tile(64).block_m == default_tile(256).block_m == 64
    assert triton_tiled_linear.rows_routed(torch.empty(4096, 1024, device="meta")) == 256
    assert triton_tiled_linear.rows_routed(torch.empty(4095, 1024, device="meta")) == 0


def test_launch_orders_row_blocks_first_and_keeps_float32_exact(monkeypatch) -> None:
    """The row blocks of one band of features are the grid's fast axis (they share the band's
    weights in L2), and float32 runs without TF32, as F.linear does; the interpreter ignores the
    dot's precision, so the launch itself is checked."""
    launches: list[tuple[tuple[int, ...], dict[str, object]]] = []

    class Recorder:
        def __getitem__(self, grid: tuple[int, ...]):  # type: ignore[no-untyped-def]
            return lambda *args, **kwargs: launches.append((grid, kwargs))

    monkeypatch.setattr(triton_tiled_linear, "_tiled_linear_kernel", Recorder())
    for dtype in (torch.float32, torch.float16):
        tiled_linear(torch.zeros(130, 64, dtype=dtype), torch.zeros(96, 64, dtype=dtype))
    tile = default_tile(130)
    assert [grid for grid, _ in launches] == [(-(-130 // tile.block_m), 96 // tile.block_n)] * 2
    assert [kwargs["INPUT_PRECISION"] for _, kwargs in launches] == ["ieee", "tf32"]


def test_layer_routes_rows_between_the_two_kernels_and_torch(monkeypatch) -> None:
    """One or two rows to the skinny matmul, more up to ``tiled_max_rows`` to the tiled one,
    the rest to torch; the same results all the way."""
    calls: list[tuple[str, int]] = []
    for module, name in ((triton_linear, "skinny_linear"), (triton_tiled_linear, "tiled_linear")):
        original = getattr(module, name)
        monkeypatch.setattr(
            module,
            name,
            lambda x, *a, _n=name, _f=original, **kw: calls.append((_n, x.shape[0])) or _f(x, *a, **kw),
        )
    layer = Linear(32, 24, bias=True).to(DEVICE)
    x = torch.randn(40, 32, device=DEVICE)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias).double()
    layer.tiled_max_rows = 20
    for rows in (1, 3, 20, 21):
        assert relative_error(layer(x[:rows]), expected[:rows]) < 1e-5
    assert calls == [("tiled_linear", 1), ("tiled_linear", 3), ("tiled_linear", 20)]  # no skinny routing set
    calls.clear()
    layer.triton_max_rows = 2
    for rows in (1, 2, 3, 20, 21):
        assert relative_error(layer(x[:rows]), expected[:rows]) < 1e-5
    assert calls == [("skinny_linear", 1), ("skinny_linear", 2), ("tiled_linear", 3), ("tiled_linear", 20)]


def test_model_decode_step_uses_the_tiled_matmul(tiny_model_factory, monkeypatch) -> None:
    """A decode step of three sequences sends the wide projections to it (the tiny model's are
    made wide enough by lowering the threshold), with the torch path's logits."""
    monkeypatch.setattr(triton_tiled_linear, "MIN_FEATURES", 128)
    llm, decode, torch_logits = decode_after_prompts(tiny_model_factory("qwen3"), [9, 10, 11])
    core = llm.engine.core

    widths: list[int] = []
    original = triton_tiled_linear.tiled_linear
    monkeypatch.setattr(
        triton_tiled_linear, "tiled_linear", lambda x, w, *a: widths.append(w.shape[0]) or original(x, w, *a)
    )
    core.runner.model.enable_triton_ops(False, tiled_linear=True)
    tiled_logits = core.runner.logits_for(decode)
    cfg = llm.engine.config.model
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    # The four projections' outputs: q|k|v, o, gate|up, down; the LM head stays on torch.
    wide = [w for w in (qkv, cfg.hidden_size, 2 * cfg.intermediate_size, cfg.hidden_size) if w >= 128]
    assert wide and widths == wide * cfg.num_layers
    assert (tiled_logits - torch_logits).abs().max().item() < 1e-4


def test_engine_option(tiny_model_factory, monkeypatch) -> None:
    monkeypatch.setattr(triton_tiled_linear, "MIN_FEATURES", 128)  # the tiny model's gate|up is 256 wide
    folder = tiny_model_factory("llama")
    on = LLM(folder, kv_cache_memory="4MiB", triton_tiled_linear=True)
    assert on.engine.core.runner.model.model.layers[0].mlp.gate_up_proj.tiled_max_rows == 256
    off = LLM(folder, kv_cache_memory="4MiB")
    assert off.engine.core.runner.model.model.layers[0].mlp.gate_up_proj.tiled_max_rows == 0
