"""Flattens a SchedulerOutput into the tensors of one forward pass (built once per step)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from inferd.attention.base import AttentionMetadata
from inferd.engine.request import Request
from inferd.sched.output import SchedulerOutput
from inferd.worker.input_buffers import StepInputBuffers


@dataclass(frozen=True)
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
    # Rows of the hidden states to sample from: one per sampling sequence, and one more for each
    # of its proposed tokens (speculative decoding), in order.
    logits_indices: torch.Tensor
    sampling_rows: list[int]  # the scheduled sequence each of those rows belongs to
    # Tokens still on the device: input_ids[carried_rows[i]] is the last step's sample number
    # carried_sources[i]; the runner writes them in before the forward.
    carried_rows: torch.Tensor
    carried_sources: torch.Tensor


class BlockTableRows:
    """numpy copies of the block tables of the last step's sequences.

    Copying a Python list into the table buffer converts it element by element (1.7 ms a step
    for 256 tables of ~100 blocks, against 0.2 ms from arrays). A table only grows while its
    request runs, so its array is rebuilt only when its length changes, once per block of tokens.
    Preemption frees a table and a readmitted request gets other blocks, and speculative decoding
    gives back the tail blocks of rejected guesses (a table that grows again to the same length
    may end in other blocks), so the key holds the request's preemption and trim counts too.
    Requests are held here so their ids stay unique.
    """

    def __init__(self) -> None:
        self._rows: dict[tuple[int, int, int], tuple[Request, np.ndarray]] = {}

    def for_step(self, out: SchedulerOutput) -> list[np.ndarray]:
        rows: dict[tuple[int, int, int], tuple[Request, np.ndarray]] = {}
        arrays = []
        for seq in out.sequences:
            request = seq.request
            key = (id(request), request.num_preemptions, request.num_table_trims)
            cached = self._rows.get(key)
            if cached is not None and len(cached[1]) == len(seq.block_table):
                array = cached[1]
            else:
                array = np.array(seq.block_table, dtype=np.int64)
            rows[key] = (seq.request, array)
            arrays.append(array)
        self._rows = rows
        return arrays


def build_inputs(
    out: SchedulerOutput,
    block_size: int,
    buffers: StepInputBuffers,
    table_rows: BlockTableRows,
    padded_seqs: int | None = None,
    last_sample_rows: Mapping[str, int] | None = None,
) -> ModelInputs:
    """Write the step into ``buffers`` and copy it to the device in one go.

    ``last_sample_rows`` maps the request ids the step before sampled to their rows in its
    token tensor; a sequence ``from_last_sample`` takes its input token from there.

    ``padded_seqs`` (for a captured decode graph) fills rows past the real sequences as padding:
    one query token each, no KV write (slot -1), empty context; their outputs are ignored.
    The returned tensors are views of the device buffer, valid until the next step is built.
    """
    buffers.wait_until_copied()
    h = buffers.host_views
    ids, pos, slots = h["input_ids"], h["positions"], h["slot_mapping"]
    query_start, seq_lens, tables = h["query_start_loc"], h["seq_lens"], h["block_tables"]
    num_seqs = len(out.sequences)
    num_rows = max(num_seqs, padded_seqs or 0)
    if num_rows > buffers.max_seqs:
        raise ValueError(f"{num_rows} sequences in one step; the input buffers hold {buffers.max_seqs}")
    tables[:num_seqs] = 0  # a row holds this step's table and zeros, never a former one's tail

    query_lens: list[int] = []
    seq_lens_host: list[int] = []
    sampling_rows: list[int] = []
    num_carried = 0
    t = 0
    query_start[0] = 0
    for row, (seq, table_row) in enumerate(zip(out.sequences, table_rows.for_step(out), strict=True)):
        n, start, table = seq.num_tokens, seq.start_pos, seq.block_table
        if t + n > buffers.max_tokens or len(table) > buffers.max_blocks_per_seq:
            raise ValueError("a step exceeds the input buffers (token budget or context length)")
        tables[row, : len(table)] = table_row
        if seq.from_last_sample:
            if last_sample_rows is None or seq.request.request_id not in last_sample_rows:
                raise ValueError(f"{seq.request.request_id!r} has no token in flight to carry")
            h["carried_rows"][num_carried] = t
            h["carried_sources"][num_carried] = last_sample_rows[seq.request.request_id]
            num_carried += 1
        if n == 1:  # decode: scalar writes beat numpy's per-call overhead
            ids[t] = seq.token_ids[0]
            pos[t] = start
            slots[t] = table[start // block_size] * block_size + start % block_size
        else:
            ids[t : t + n] = seq.token_ids
            span = pos[t : t + n]
            span[:] = range(start, start + n)
            slots[t : t + n] = tables[row, span // block_size] * block_size + span % block_size
        t += n
        query_start[row + 1] = t
        seq_lens[row] = start + n
        query_lens.append(n)
        seq_lens_host.append(start + n)
        if seq.sample:
            guesses = seq.num_draft_tokens
            if guesses:  # a sample after the last known token and after each guess
                at = len(sampling_rows)
                h["logits_indices"][at : at + guesses + 1] = range(t - 1 - guesses, t)
                sampling_rows.extend([row] * (guesses + 1))
            else:
                h["logits_indices"][len(sampling_rows)] = t - 1
                sampling_rows.append(row)
    write_padding_rows(buffers, num_seqs, num_rows, first_token=t)
    buffers.copy_to_device(num_rows)

    d = buffers.device_views
    meta = AttentionMetadata(
        slot_mapping=d["slot_mapping"][:t],
        query_start_loc=d["query_start_loc"][: num_seqs + 1],
        seq_lens=d["seq_lens"][:num_seqs],
        block_tables=d["block_tables"][:num_seqs],
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens_host),
        query_lens_host=tuple(query_lens),
        seq_lens_host=tuple(seq_lens_host),
    )
    return ModelInputs(
        input_ids=d["input_ids"][:t],
        positions=d["positions"][:t],
        meta=meta,
        logits_indices=d["logits_indices"][: len(sampling_rows)],
        sampling_rows=sampling_rows,
        carried_rows=d["carried_rows"][:num_carried],
        carried_sources=d["carried_sources"][:num_carried],
    )


def write_padding_rows(buffers: StepInputBuffers, first_row: int, end_row: int, first_token: int) -> None:
    """Rows ``first_row..end_row`` become padding: one query token each at ``first_token`` on,
    token 0 at position 0, KV slot -1 (not written), an empty context and an all-zero table row.
    The caller has waited for the last copy (``buffers.wait_until_copied``)."""
    h = buffers.host_views
    tokens = slice(first_token, first_token + end_row - first_row)
    h["input_ids"][tokens] = 0
    h["positions"][tokens] = 0
    h["slot_mapping"][tokens] = -1
    h["query_start_loc"][first_row + 1 : end_row + 1] = range(first_token + 1, tokens.stop + 1)
    h["seq_lens"][first_row:end_row] = 0
    h["block_tables"][first_row:end_row] = 0
