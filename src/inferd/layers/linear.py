"""The projection layer of the decoder: ``nn.Linear`` that can send few-row inputs to Triton."""

from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same checkpoint names) whose inputs of up to
    ``triton_max_rows`` rows go to the skinny Triton matmul of ``layers/triton_linear.py``: decode
    steps of one or two sequences, where cuBLAS reads small weights well under the bandwidth."""

    triton_max_rows = 0  # 0: always torch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and 0 < x.shape[0] <= self.triton_max_rows:
            from inferd.layers import triton_linear

            return triton_linear.skinny_linear(x, self.weight, self.bias)
        return super().forward(x)
