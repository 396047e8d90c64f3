"""RMSNorm, computed in float32 like the reference implementations, optionally fused with the
residual add that precedes it."""

from __future__ import annotations

from typing import overload

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``weight * rmsnorm(x)``; called with ``residual``, adds ``x`` to it first and returns
    ``(normed, new_residual)`` so a Triton kernel can do the add and the norm in one pass."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.use_triton = False

    @overload
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    @overload
    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.use_triton:
            from inferd.layers import triton_ops

            if residual is None:
                return triton_ops.rms_norm(x, self.weight, self.eps)
            return triton_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._normalize(x)
        residual = x + residual
        return self._normalize(residual), residual

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
