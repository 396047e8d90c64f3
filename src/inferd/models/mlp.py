"""The SiLU-gated MLP of the Llama family, and the tensor-parallel sum its output projection needs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from inferd.layers.activation import SiluAndMul
from inferd.layers.linear import Linear

AllReduce = Callable[[torch.Tensor], None]


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = SiluAndMul()
        # Under tensor parallelism: sums the ranks' partial outputs (None inside a block that sums
        # its parts once, as a mixture of experts does with its shared expert).
        self.all_reduce: AllReduce | None = None

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The MLP from the output of ``gate_up_proj``, which the layer runs (with its norm)."""
        return reduced(self.down_proj.forward_gated(gate_up, self.act_fn), self.all_reduce)


def reduced(partial: torch.Tensor, all_reduce: AllReduce | None) -> torch.Tensor:
    """A row-split projection's output: each rank holds a partial sum until they are added up."""
    if all_reduce is not None:
        all_reduce(partial)
    return partial
