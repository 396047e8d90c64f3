"""Gated activation used by the Llama family MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for a fused [..., 2 * intermediate] projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
