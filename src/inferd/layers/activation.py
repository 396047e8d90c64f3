"""Gated activation used by the Llama family MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for a fused [..., 2 * intermediate] projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    """``silu_and_mul`` as a layer, so the model can switch it to the Triton kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.use_triton = False

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            from inferd.layers import triton_ops

            return triton_ops.silu_and_mul(gate_up)
        return silu_and_mul(gate_up)
