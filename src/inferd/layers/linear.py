"""The projection layer of the decoder: ``nn.Linear`` that can send few-row inputs to Triton."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from inferd.layers import quantized
from inferd.layers.activation import SiluAndMul
from inferd.layers.linear_operands import WeightScale
from inferd.layers.norm import RMSNorm

if TYPE_CHECKING:
    from inferd.layers.lora import LoraWeights


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same checkpoint names) whose inputs of up to
    ``triton_max_rows`` rows go to the skinny Triton matmul of ``layers/triton_linear.py``: decode
    steps of one or two sequences, where cuBLAS reads small weights well under the bandwidth.

    With ``fuse_input_ops``, those rows also make the projection's input inside the matmul
    (``forward_normed``, ``forward_gated``): the decoder's norm, or SiLU-and-mul, then costs no
    launch of its own, which at one sequence is a third of a layer's kernels.

    With ``lora`` (LoRA adapters, ``layers/lora.py``), each request's adapter adds its low-rank
    term to its rows after the matmul; its engine makes no input inside the matmul.
    """

    triton_max_rows = 0  # 0: always torch
    fuse_input_ops = False
    # Inputs of more rows than the skinny matmul takes, up to this many, go to the tensor-core
    # matmul of ``layers/triton_tiled_linear.py`` (0: none).
    tiled_max_rows = 0
    lora: LoraWeights | None = None
    # Set on a projection that holds low-bit weights (``layers/quantized.py:hold_quantized``): the
    # (rows, columns) of weight each entry of its ``weight_scale`` parameter covers.
    weight_block: tuple[int, int] | None = None
    # A buffer, set on a projection whose weight's input columns were reordered at load (a GPTQ
    # checkpoint in activation order, ``models/gptq_awq.py``): its input is reordered alike.
    input_order: torch.Tensor | None
    # What a load-time fold of the checkpoint's KV-cache scales (``models/kv_scales.py``) multiplied
    # each output row by; None: nothing. A LoRA adapter's B rows take the same factors.
    output_row_factors: torch.Tensor | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("input_order", None, persistent=False)

    def quant_scale(self) -> torch.Tensor:
        """The ``weight_scale`` parameter of a projection with low-bit weights."""
        scale = self._parameters["weight_scale"]
        assert scale is not None and self.weight_block is not None, "not a low-bit projection"
        return scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        if self.lora is not None:
            self.lora.add_to(out, x)
        return out

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_order is not None:
            x = x.index_select(-1, self.input_order)
        if self._routed(x):
            from inferd.layers import triton_linear

            return triton_linear.skinny_linear(x, self.weight, self.bias, scale=self._scale_operand())
        low_bit = self._scale_operand()
        if low_bit is not None:
            return F.linear(x, quantized.dequantize(self.weight, low_bit, x.dtype), self.bias)
        if x.dim() == 2 and self.triton_max_rows < x.shape[0] <= self.tiled_max_rows:
            from inferd.layers import triton_tiled_linear

            return triton_tiled_linear.tiled_linear(x, self.weight, self.bias)
        return super().forward(x)

    def forward_normed(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``self(norm(x + residual))`` and the new residual stream ``x + residual``; without a
        residual, ``self(norm(x))`` and ``x``."""
        if self._fuses_input(x):
            from inferd.layers import triton_linear

            weight, bias, scale = self.weight, self.bias, self._scale_operand()
            return triton_linear.skinny_norm_linear(
                x, residual, norm.weight, norm.eps, weight, bias, scale=scale
            )
        if residual is None:
            return self(norm(x)), x
        normed, residual = norm(x, residual)
        return self(normed), residual

    def forward_gated(self, gate_up: torch.Tensor, act: SiluAndMul) -> torch.Tensor:
        """``self(act(gate_up))``, for the gate|up halves of the MLP's first projection."""
        if self._fuses_input(gate_up):
            from inferd.layers import triton_linear

            return triton_linear.skinny_silu_linear(
                gate_up, self.weight, self.bias, scale=self._scale_operand()
            )
        return self(act(gate_up))

    def _routed(self, x: torch.Tensor) -> bool:
        return x.dim() == 2 and 0 < x.shape[0] <= self.triton_max_rows

    def _fuses_input(self, x: torch.Tensor) -> bool:
        """Whether the skinny matmul makes this input itself: not under LoRA, whose term reads the
        input made, nor where the input is reordered first."""
        return self.fuse_input_ops and self.lora is None and self.input_order is None and self._routed(x)

    def _scale_operand(self) -> WeightScale | None:
        """How to read low-bit weights (their scales, zero points and packing), for the skinny
        matmul as it loads them and for widening them; None for wide ones."""
        if self.weight_block is None:
            return None
        zero = self._parameters.get("weight_zero_point")
        columns = self.in_features if self.weight.dtype == torch.int32 else None
        return WeightScale(self.quant_scale(), self.weight_block, zero, columns)


def route_projections(model: nn.Module, linear: bool, tiled_linear: bool, fuse_inputs: bool = False) -> None:
    """Send each ``Linear`` of ``model``: few-row inputs to the skinny Triton matmul (``linear``;
    with ``fuse_inputs`` it also makes their input), wide ones of up to 256 rows to the tiled one
    (``tiled_linear``), the rest to torch. Imports the kernels here, so a missing triton fails at
    start-up, not in the first forward."""
    triton_linear = importlib.import_module("inferd.layers.triton_linear") if linear else None
    tiled = importlib.import_module("inferd.layers.triton_tiled_linear") if tiled_linear else None
    for module in model.modules():
        if isinstance(module, Linear):
            readable = quantized.skinny_kernel_reads(module.weight.dtype, module.weight.device)
            module.triton_max_rows = (
                triton_linear.rows_routed(module.weight) if triton_linear and readable else 0
            )
            module.fuse_input_ops = fuse_inputs
            # The tiled matmul reads 16- and 32-bit weights only.
            wide = tiled is not None and module.weight_block is None
            module.tiled_max_rows = tiled.rows_routed(module.weight) if tiled is not None and wide else 0


def route_projections_only(
    model: nn.Module, family: str, linear: bool, fused_linear: bool, tiled_linear: bool, decode_rotary: bool
) -> None:
    """``route_projections`` for a model whose norms, activation and rotary are its own (Gemma's,
    OLMo's): the Triton kernels that fuse the Llama family's forms of those into a matmul or the
    decode attention would compute the wrong ones, so asking for them is refused."""
    if fused_linear or decode_rotary:
        raise ValueError(f"{family} computes its own norms and rotary: no triton_fused_linear or "
                         "triton_decode_rotary")  # fmt: skip
    route_projections(model, linear, tiled_linear)
