"""The paged KV cache tensors: one (K, V) pair per layer."""

from __future__ import annotations

import torch

from inferd.config import ModelConfig


def allocate_kv_caches(
    model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed ``[num_blocks, block_size, kv_heads, head_dim]`` K and V tensors for every layer of
    ``model`` (one rank's shape under tensor parallelism)."""
    shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(model.num_layers)
    ]
