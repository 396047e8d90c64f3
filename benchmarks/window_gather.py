"""One decode attention call of the PyTorch backend for a sliding-window layer: gathering each
sequence's whole context (as before) against only its window's blocks (``window_start_block``).

SmolLM-135M's heads (9 over 3 KV heads, dim 64), blocks of 16, random caches with each sequence's
blocks scattered; "whole context" is the same call with the gather told of no window (the mask still
applies it). Milliseconds, median of 7 after 2 warm-ups.

    python benchmarks/window_gather.py
"""

from __future__ import annotations

import functools
import itertools
import statistics
import time
from collections.abc import Callable

import torch

from inferd.attention import torch_backend
from inferd.attention.base import AttentionMetadata
from inferd.attention.torch_backend import TorchAttentionBackend

BLOCK_SIZE, HEADS, KV_HEADS, DIM = 16, 9, 3, 64
CASES = [(32, 2048, 4096, 512), (64, 512, 2048, 256), (16, 1000, 1200, 1024)]  # seqs, contexts, window


def decode_step(contexts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    seq_lens = [c + 1 for c in contexts]
    blocks = [-(-n // BLOCK_SIZE) for n in seq_lens]
    k_cache = torch.randn(sum(blocks) + 1, BLOCK_SIZE, KV_HEADS, DIM)
    order = torch.randperm(sum(blocks)) + 1
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    for i, (start, n) in enumerate(zip(itertools.accumulate([0, *blocks]), blocks, strict=False)):
        tables[i, :n] = order[start : start + n]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64),
        query_start_loc=torch.arange(len(seq_lens) + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        max_query_len=1,
        max_seq_len=max(seq_lens),
        query_lens_host=(1,) * len(seq_lens),
        seq_lens_host=tuple(seq_lens),
    )
    return torch.randn(len(seq_lens), HEADS, DIM), k_cache, torch.randn_like(k_cache), meta


def median_ms(call: Callable[[], object]) -> float:
    for _ in range(2):
        call()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    torch.manual_seed(0)
    windowed = torch_backend._padded_context

    def whole(*args: object) -> object:
        return windowed(*args[:-1], 0)  # type: ignore[arg-type]

    for num_seqs, low, high, window in CASES:
        contexts = [int(n) for n in torch.randint(low, high, (num_seqs,))]
        q, k_cache, v_cache, meta = decode_step(contexts)
        call = functools.partial(TorchAttentionBackend().attend, q, k_cache, v_cache, meta, DIM**-0.5, window)
        new = median_ms(call)
        torch_backend._padded_context = whole  # type: ignore[assignment]
        try:
            old = median_ms(call)
        finally:
            torch_backend._padded_context = windowed
        print(f"{num_seqs} contexts in [{low}, {high}), window {window}: whole context {old:.2f} ms, "
              f"window's blocks {new:.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
