"""Persistent step-input buffers: one host staging buffer, one device twin, one copy per step.

Every integer a forward pass needs (token ids, positions, KV slots, rows to sample, query starts,
context lengths, block tables) lives at a fixed offset of one int64 buffer. The runner fills the
host buffer through numpy, then a single ``copy_`` moves the used prefix to the device. Fixed
offsets give every region a fixed device address, which is what a captured CUDA graph reads.

The host buffer is pinned on a GPU, so the copy is asynchronous: the DMA reads the host buffer
when the stream reaches it, which may be after the next step has started to fill it (a step whose
sequences are all mid-prompt samples nothing, so nothing syncs). ``wait_until_copied`` blocks on an
event recorded after the copy; ``build_inputs`` calls it before writing. On the CPU the device
buffer *is* the host buffer: no copy at all.

Everything is int64 because ``index_copy_`` (the PyTorch backend's KV write) takes only int64
indices; the Triton kernels read any integer type.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

_Buffer = TypeVar("_Buffer", np.ndarray, torch.Tensor)


class StepInputBuffers:
    """Regions, in order: ids, positions, slots [max_tokens]; logits rows [max_sample_rows, by
    default max_seqs: more with speculative decoding, which samples several rows a sequence]; query starts
    [max_seqs + 1]; context lengths [max_seqs]; carried token rows and their sources [max_seqs
    each] (tokens fed from the last step's samples on the device); block tables [max_seqs,
    max_blocks_per_seq], last so a step copies only the table rows it uses."""

    def __init__(
        self,
        max_tokens: int,
        max_seqs: int,
        max_blocks_per_seq: int,
        device: torch.device,
        max_sample_rows: int | None = None,
    ) -> None:
        self.max_tokens = max_tokens
        self.max_seqs = max_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = device
        sizes = {
            "input_ids": max_tokens,
            "positions": max_tokens,
            "slot_mapping": max_tokens,
            "logits_indices": max_sample_rows or max_seqs,
            "query_start_loc": max_seqs + 1,
            "seq_lens": max_seqs,
            "carried_rows": max_seqs,
            "carried_sources": max_seqs,
        }
        self._spans: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in sizes.items():
            self._spans[name] = (offset, offset + size)
            offset += size
        self._tables_offset = offset
        total = offset + max_seqs * max_blocks_per_seq
        on_gpu = device.type == "cuda"
        self.host = torch.zeros(total, dtype=torch.int64, pin_memory=on_gpu)
        self.device_buffer = torch.zeros(total, dtype=torch.int64, device=device) if on_gpu else self.host
        self._copied = torch.cuda.Event() if on_gpu else None
        self.host_views = self._views(self.host.numpy())
        self.device_views = self._views(self.device_buffer)

    def _views(self, buffer: _Buffer) -> dict[str, _Buffer]:
        views = {name: buffer[start:end] for name, (start, end) in self._spans.items()}
        tables = buffer[self._tables_offset :]
        views["block_tables"] = tables.reshape(self.max_seqs, self.max_blocks_per_seq)
        return views

    def copy_to_device(self, num_seq_rows: int) -> None:
        """Move everything up to the end of the first ``num_seq_rows`` block-table rows."""
        if self.device_buffer is self.host:
            return
        end = self._tables_offset + num_seq_rows * self.max_blocks_per_seq
        self.device_buffer[:end].copy_(self.host[:end], non_blocking=True)
        assert self._copied is not None
        self._copied.record(torch.cuda.current_stream(self.device))

    def wait_until_copied(self) -> None:
        """Block until the last copy has read the host buffer, so it can be written again."""
        if self._copied is not None:
            self._copied.synchronize()
