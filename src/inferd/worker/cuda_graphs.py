"""CUDA graphs for decode steps, captured at start-up for a ladder of batch sizes.

A decode step of a small model is dozens of short kernels per layer; launching them one by one
from Python costs more than running them. A captured graph replays the whole forward pass with
one launch. Graphs read fixed addresses, so every captured forward reads the persistent input
buffers (``input_buffers.py``) and a step of ``n`` sequences runs the smallest graph of at least
``n`` rows, the rows past ``n`` filled as padding that writes no KV and attends to nothing.

Only pure-decode steps (one token per sequence) run as graphs; steps with prompt chunks vary in
shape and stay eager. Graphs need the Triton attention backend with a fixed context split
(``TritonAttentionBackend(decode_splits=...)``): the PyTorch backend loops on host-side lengths.

A small batch splits each context across SMs, but how many ways pays off depends on the context
length, which a graph cannot see. So each batch size gets one graph per context tier: the split
chosen for the longest context of the tier (``context_tiers``). A step replays the graph of its
batch size and of the first tier that holds its longest context, which the host knows. Short
contexts then take an unsplit graph, without the merge kernel or programs that find no keys.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import Protocol

import torch

from inferd.attention.base import AttentionBackend, AttentionMetadata
from inferd.models.registry import CausalLM
from inferd.sched.output import SchedulerOutput
from inferd.worker.input_batch import write_padding_rows
from inferd.worker.input_buffers import StepInputBuffers

logger = logging.getLogger(__name__)

# Graphs for batches beyond this many sequences save little (the step is long anyway) and cost memory.
MAX_GRAPH_BATCH = 512


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8, up to ``max_num_seqs`` (included) or the cap."""
    top = min(max_num_seqs, MAX_GRAPH_BATCH)
    sizes = [s for s in (1, 2, 4) if s <= top] + list(range(8, top + 1, 8))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


def context_tiers(max_model_len: int, splits_for: Callable[[int], int], first: int) -> list[int]:
    """Longest contexts of the tiers for one batch size, ascending, the last ``max_model_len``.

    Candidates are ``first`` (the longest context never split), then about double each time
    (``2 * bound + 1``: 511, 1023, 2047... from 511) while under half of ``max_model_len``, so no
    tier ends just short of the last. A candidate is kept only if ``splits_for`` (the split a
    context of that length would get) differs from the next kept tier's, so every tier has its
    own split and none is captured twice.
    """
    candidates = []
    bound = first
    while bound < max_model_len:
        if bound == first or 2 * bound < max_model_len:
            candidates.append(bound)
        bound = 2 * bound + 1
    tiers = [max_model_len]
    for bound in reversed(candidates):
        if splits_for(bound) != splits_for(tiers[0]):
            tiers.insert(0, bound)
    return tiers


Replay = Callable[[], torch.Tensor]


class GraphCapturer(Protocol):
    """Turns a forward pass over static buffers into a replay that returns its static output."""

    def capture(self, forward: Replay) -> Replay: ...


class CudaGraphCapturer:
    """Captures into CUDA graphs that share one memory pool (captured largest first, the smaller
    graphs reuse the larger ones' memory)."""

    def __init__(self) -> None:
        self._pool = torch.cuda.graph_pool_handle()

    def capture(self, forward: Replay) -> Replay:
        forward()  # warm-up: compiles the Triton kernels and settles the allocator outside the graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = forward()

        def replay() -> torch.Tensor:
            graph.replay()
            return output

        return replay


class DecodeGraphs:
    """The captured decode forwards, one per (batch size, context tier), and the choice among
    them per step."""

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        buffers: StepInputBuffers,
        backend_for: Callable[[int, int], AttentionBackend],
        batch_sizes: list[int],
        tiers_for: Callable[[int], list[int]],
    ) -> None:
        """``backend_for(size, longest_context)`` gives a graph its attention backend;
        ``tiers_for(size)`` the longest contexts of a batch size's tiers (see ``context_tiers``)."""
        self._model = model
        self._kv_caches = kv_caches
        self._buffers = buffers
        self._backend_for = backend_for
        self.batch_sizes = sorted(batch_sizes)
        self.tiers = {size: tiers_for(size) for size in self.batch_sizes}
        self._replays: dict[tuple[int, int], Replay] = {}
        self.capture_seconds = 0.0

    @property
    def num_graphs(self) -> int:
        return sum(len(tiers) for tiers in self.tiers.values())

    def capture(self, capturer: GraphCapturer) -> None:
        start = time.perf_counter()
        for size in reversed(self.batch_sizes):
            for tier in reversed(self.tiers[size]):
                self._replays[size, tier] = capturer.capture(self._forward_for(size, tier))
        self.capture_seconds = time.perf_counter() - start
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %s; context tiers %s) in %.1f s",
            self.num_graphs,
            ", ".join(map(str, self.batch_sizes)),
            "; ".join(f"{size}: {'/'.join(map(str, self.tiers[size]))}" for size in self.batch_sizes
                      if len(self.tiers[size]) > 1) or "one per size",
            self.capture_seconds,
        )  # fmt: skip

    def _forward_for(self, size: int, tier: int) -> Replay:
        views = self._buffers.device_views
        meta = AttentionMetadata(
            slot_mapping=views["slot_mapping"][:size],
            query_start_loc=views["query_start_loc"][: size + 1],
            seq_lens=views["seq_lens"][:size],
            block_tables=views["block_tables"][:size],
            max_query_len=1,
            # The host-side lengths describe the captured shape, not any one step's contexts.
            max_seq_len=tier,
            query_lens_host=(1,) * size,
            seq_lens_host=(tier,) * size,
        )
        input_ids, positions = views["input_ids"][:size], views["positions"][:size]
        backend = self._backend_for(size, tier)
        # Captured with padding only: the warm-up and capture runs write no KV and read none.
        self._buffers.wait_until_copied()
        write_padding_rows(self._buffers, 0, size, first_token=0)
        self._buffers.copy_to_device(size)

        def forward() -> torch.Tensor:
            hidden: torch.Tensor = self._model(input_ids, positions, self._kv_caches, meta, backend)
            return hidden

        return forward

    def padded_size(self, out: SchedulerOutput) -> int | None:
        """The graph batch size for this step, or None when it must run eagerly."""
        num_seqs = len(out.sequences)
        if out.num_batched_tokens != num_seqs or num_seqs > self.batch_sizes[-1]:
            return None
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, num_seqs)]

    def tier_for(self, size: int, max_seq_len: int) -> int:
        """The tier of a step of ``size`` rows whose longest context is ``max_seq_len``."""
        tiers = self.tiers[size]
        return tiers[min(bisect.bisect_left(tiers, max_seq_len), len(tiers) - 1)]

    def replay(self, size: int, max_seq_len: int) -> torch.Tensor:
        """Run the graph of ``size`` rows for contexts up to ``max_seq_len`` on what the buffers
        hold; returns its hidden states."""
        return self._replays[size, self.tier_for(size, max_seq_len)]()
