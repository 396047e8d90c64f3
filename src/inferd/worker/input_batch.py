"""Flattens a SchedulerOutput into the tensors of one forward pass (built once per step)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inferd.attention.base import AttentionMetadata
from inferd.sched.output import SchedulerOutput


@dataclass(frozen=True)
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states to sample from, one per sampling sequence
    sampling_rows: list[int]  # which scheduled sequences sample this step


def build_inputs(out: SchedulerOutput, block_size: int, device: torch.device) -> ModelInputs:
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start = [0]
    seq_lens: list[int] = []
    logits_indices: list[int] = []
    sampling_rows: list[int] = []
    max_blocks = max(len(s.block_table) for s in out.sequences)
    tables = torch.zeros((len(out.sequences), max_blocks), dtype=torch.int32)

    for row, seq in enumerate(out.sequences):
        n = seq.num_tokens
        input_ids.extend(seq.token_ids)
        span = range(seq.start_pos, seq.start_pos + n)
        positions.extend(span)
        table = seq.block_table
        slots.extend(table[p // block_size] * block_size + p % block_size for p in span)
        query_start.append(query_start[-1] + n)
        seq_lens.append(seq.start_pos + n)
        tables[row, : len(table)] = torch.tensor(table, dtype=torch.int32)
        if seq.sample:
            logits_indices.append(query_start[-1] - 1)
            sampling_rows.append(row)

    query_lens = tuple(b - a for a, b in zip(query_start, query_start[1:], strict=False))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64).to(device, non_blocking=True),
        query_start_loc=torch.tensor(query_start, dtype=torch.int32).to(device, non_blocking=True),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device, non_blocking=True),
        block_tables=tables.to(device, non_blocking=True),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_host=query_lens,
        seq_lens_host=tuple(seq_lens),
    )
    return ModelInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.long).to(device, non_blocking=True),
        positions=torch.tensor(positions, dtype=torch.long).to(device, non_blocking=True),
        meta=meta,
        logits_indices=torch.tensor(logits_indices, dtype=torch.long).to(device, non_blocking=True),
        sampling_rows=sampling_rows,
    )
