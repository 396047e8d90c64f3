"""Attention over the paged KV cache with our Triton kernels (the GPU backend).

Triton is imported when the backend is built, not when this module is imported, so the
package imports cleanly where triton is absent.
"""

from __future__ import annotations

import torch

from inferd.attention.base import AttentionMetadata
from inferd.layers.rotary import TritonRotary


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
        window: int = 0,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        self._kernels.store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, meta, scale, window, softcap)

    def rotate_store_attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rotary: TritonRotary,
        qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
    ) -> torch.Tensor:
        """A pure decode step's attention from the unrotated q, k and v: one kernel rotates (after
        the q/k norms), stores the new K/V and attends (``paged_decode_rotary_attention``)."""
        if not meta.is_pure_decode:
            raise ValueError("rotate_store_attend takes pure decode steps only")
        return self._kernels.paged_decode_rotary_attention(
            q, k, v, rotary.positions, rotary.cos_table, rotary.sin_table, k_cache, v_cache,
            meta.slot_mapping, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
            self._num_splits(meta, k_cache, q.device, window), qk_norm, window,
        )  # fmt: skip

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        kernels = self._kernels
        if meta.is_pure_decode:
            return kernels.paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
                self._num_splits(meta, k_cache, q.device, window), window=window, softcap=softcap,
            )  # fmt: skip
        return kernels.paged_extend_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.max_query_len, scale, window=window, softcap=softcap,
        )  # fmt: skip

    def _num_splits(
        self, meta: AttentionMetadata, k_cache: torch.Tensor, device: torch.device, window: int = 0
    ) -> int:
        kernels = self._kernels
        # A sliding-window layer reads at most its window of each context.
        longest = min(meta.max_seq_len, window) if window else meta.max_seq_len
        return self._decode_splits or kernels.default_num_splits(
            meta.num_seqs, k_cache.shape[2], longest, kernels.num_sms(device)
        )
