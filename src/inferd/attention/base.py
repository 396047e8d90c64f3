"""The attention backend interface and the per-step metadata it reads.

KV cache layout (one pair of tensors per layer):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
A token's slot is ``block_id * block_size + offset_in_block``.

A step's batch is flat: the query tokens of all sequences are concatenated (no padding).
Sequence ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]``; those rows are the
*last* ``q_len`` tokens of its context of ``seq_lens[i]`` tokens, so query row ``j`` sits at
position ``seq_lens[i] - q_len + j`` and attends causally to keys ``0..that position``; in a
sliding-window layer (``window`` > 0) only to the last ``window`` of them, as Hugging Face's sliding
masks read it (key position > query position - window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Everything attention needs for one step, built once by the model runner."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V is written
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies, so the CPU backend can loop over sequences without device syncs.
    query_lens_host: tuple[int, ...]
    seq_lens_host: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @classmethod
    def from_host(
        cls,
        slots: list[int],
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: torch.Tensor,
        device: torch.device | str,
    ) -> AttentionMetadata:
        """A step's metadata from host lists (a draft model's passes, tests, benchmarks; the model
        runner fills persistent buffers instead): each new token's cache slot, each sequence's
        query and context lengths, and the block tables ([sequences, blocks], int32)."""
        starts = [0]
        for length in query_lens:
            starts.append(starts[-1] + length)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=block_tables.to(device),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_host=tuple(query_lens),
            seq_lens_host=tuple(seq_lens),
        )

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(Protocol):
    """Writes this step's K/V into the paged cache and attends over it (``forward``), or attends
    over a cache that already holds them (``attend``)."""

    name: str

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,  # a sliding-window layer's: each row sees its last `window` positions
        softcap: float = 0.0,  # > 0: scaled scores capped as softcap * tanh(score / softcap) (Gemma 2)
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...

    def attend(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        """``forward`` for a step whose K/V are already in the cache (stored by the rotary kernel)."""
        ...
