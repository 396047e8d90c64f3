"""Step inputs written into the persistent buffers: values, padding, and block-table reuse."""

from __future__ import annotations

import torch

from inferd.engine.request import Request
from inferd.sampling_params import SamplingParams
from inferd.sched.output import ScheduledSequence, SchedulerOutput
from inferd.worker.input_batch import BlockTableRows, build_inputs
from inferd.worker.input_buffers import StepInputBuffers


def _request(name: str) -> Request:
    return Request(name, [1, 2, 3], SamplingParams(), frozenset(), 1)


def test_a_mixed_step_lands_in_the_buffers_with_padding_rows() -> None:
    buffers = StepInputBuffers(max_tokens=16, max_seqs=4, max_blocks_per_seq=4, device=torch.device("cpu"))
    a, b = _request("a"), _request("b")
    out = SchedulerOutput(
        [
            ScheduledSequence(a, [7, 8, 9], 2, [5, 3], True),  # a chunk at positions 2..4, 4 per block
            ScheduledSequence(b, [4], 6, [1, 6], False),  # a decode row that samples nothing
        ],
        [],
    )
    inputs = build_inputs(out, 4, buffers, BlockTableRows(), padded_seqs=3)
    assert inputs.input_ids.tolist() == [7, 8, 9, 4]
    assert inputs.positions.tolist() == [2, 3, 4, 6]
    # Position p of a sequence lives in slot table[p // 4] * 4 + p % 4.
    assert inputs.meta.slot_mapping.tolist() == [22, 23, 12, 26]
    assert inputs.meta.query_start_loc.tolist() == [0, 3, 4]
    assert inputs.meta.seq_lens.tolist() == [5, 7]
    assert inputs.meta.block_tables.tolist() == [[5, 3, 0, 0], [1, 6, 0, 0]]
    assert inputs.logits_indices.tolist() == [2] and inputs.sampling_rows == [0]
    assert (inputs.meta.max_query_len, inputs.meta.max_seq_len) == (3, 7)
    h = buffers.host_views  # the padding row: one token, no KV write, empty context
    assert (h["slot_mapping"][4], h["query_start_loc"][3], h["seq_lens"][2]) == (-1, 5, 0)


def test_block_table_arrays_are_rebuilt_only_when_a_table_changes_length() -> None:
    rows = BlockTableRows()
    a, b = _request("a"), _request("b")
    first = rows.for_step(SchedulerOutput([ScheduledSequence(a, [1], 3, [4, 2], True)], []))
    same = rows.for_step(SchedulerOutput([ScheduledSequence(a, [1], 4, [4, 2], True)], []))
    assert same[0] is first[0]
    grown = rows.for_step(SchedulerOutput([ScheduledSequence(a, [1], 8, [4, 2, 9], True)], []))
    assert grown[0].tolist() == [4, 2, 9]
    # Preempted (even in a step that ran nothing), `a` comes back with other blocks of the same
    # count: its table is read afresh.
    a.num_preemptions += 1
    back = rows.for_step(SchedulerOutput([ScheduledSequence(a, [1], 8, [7, 8, 3], True)], []))
    assert back[0].tolist() == [7, 8, 3]
    # A step without `b` forgets it.
    rows.for_step(SchedulerOutput([ScheduledSequence(b, [1], 0, [1], True)], []))
    assert len(rows._rows) == 1
