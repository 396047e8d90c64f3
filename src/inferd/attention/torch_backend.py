"""Reference attention backend in plain PyTorch; runs on the CPU and any device.

Pure-decode steps (the common case) gather every sequence's keys through its block table into
one padded batch and make a single SDPA call. Steps with prefill chunks attend per sequence,
with a causal mask offset by the context already in the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inferd.attention.base import AttentionMetadata


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Keys (or values) of one sequence, [length, kv_heads, dim], read through its block table."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = cache.index_select(0, block_table[:num_blocks])
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:length]


class TorchAttentionBackend:
    name = "torch"

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
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_pure_decode:
            return self._decode(q, k_cache, v_cache, meta, scale)
        return self._varlen(q, k_cache, v_cache, meta, scale)

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        num_seqs = meta.num_seqs
        block_size = k_cache.shape[1]
        num_blocks = -(-meta.max_seq_len // block_size)
        table = meta.block_tables[:, :num_blocks].reshape(-1)
        # [seqs, blocks * block_size, kv_heads, dim] -> [seqs, kv_heads, ctx, dim]
        keys = k_cache.index_select(0, table).view(num_seqs, -1, k_cache.shape[2], k_cache.shape[3])
        values = v_cache.index_select(0, table).view(num_seqs, -1, v_cache.shape[2], v_cache.shape[3])
        keys = keys[:, : meta.max_seq_len].transpose(1, 2)
        values = values[:, : meta.max_seq_len].transpose(1, 2)
        positions = torch.arange(meta.max_seq_len, device=q.device)
        mask = positions.unsqueeze(0) < meta.seq_lens.unsqueeze(1)  # [seqs, ctx]
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [seqs, heads, 1, dim]
            keys,
            values,
            attn_mask=mask[:, None, None, :],
            scale=scale,
            enable_gqa=q.shape[1] != keys.shape[1],
        )
        return out.squeeze(2)

    def _varlen(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        start = 0
        for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host, strict=True)):
            keys = gather_context(k_cache, meta.block_tables[i], seq_len).transpose(0, 1)
            values = gather_context(v_cache, meta.block_tables[i], seq_len).transpose(0, 1)
            query = q[start : start + q_len].transpose(0, 1)  # [heads, q_len, dim]
            # Query row j sits at position seq_len - q_len + j and sees keys up to there.
            rows = torch.arange(q_len, device=q.device).unsqueeze(1) + (seq_len - q_len)
            mask = torch.arange(seq_len, device=q.device).unsqueeze(0) <= rows
            attended = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=scale, enable_gqa=query.shape[0] != keys.shape[0]
            )
            out[start : start + q_len] = attended.transpose(0, 1)
            start += q_len
        return out
