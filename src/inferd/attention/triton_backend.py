"""Attention over the paged KV cache with our Triton kernels (the GPU backend).

Triton is imported when the backend is built, not when this module is imported, so the
package imports cleanly where triton is absent.
"""

from __future__ import annotations

import torch

from inferd.attention.base import AttentionMetadata


class TritonAttentionBackend:
    """Stores the step's K/V, then runs the decode kernel for a pure-decode batch and the
    extend kernel (which also handles one-token rows) for any batch with a longer query."""

    name = "triton"

    def __init__(self, decode_splits: int | None = None) -> None:
        """``decode_splits`` fixes the decode kernel's context split (e.g. for a CUDA graph);
        None picks it per step from the batch shape."""
        from inferd.attention import triton_kernels

        self._kernels = triton_kernels
        self._decode_splits = decode_splits

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        self._kernels.store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, meta, scale)

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        kernels = self._kernels
        if meta.is_pure_decode:
            num_splits = self._decode_splits or kernels.default_num_splits(
                meta.num_seqs, k_cache.shape[2], meta.max_seq_len, kernels.num_sms(q.device)
            )
            return kernels.paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale, num_splits
            )
        return kernels.paged_extend_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.max_query_len, scale,
        )  # fmt: skip
