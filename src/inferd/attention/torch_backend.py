"""Reference attention backend in plain PyTorch; runs on the CPU and any device.

Pure-decode steps (the common case) gather every sequence's keys through its block table into
one padded batch and make a single SDPA call; so do steps whose sequences all run a few query
tokens (speculative decoding's guesses, short prompts), their queries padded too. Steps with
longer prefill chunks attend per sequence, with a causal mask offset by the context already in
the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from inferd.attention.base import AttentionMetadata
from inferd.attention.kv_dtype import FP8_KV_DTYPE, as_read_back, to_cache


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    for new, cache in ((k, k_cache), (v, v_cache)):
        # A non-finite key or value (a broken request's) is stored as 0: the padded batches read a
        # block's slots past a sequence's length, masked, and 0 * NaN would carry it into the
        # outputs of whoever takes the block next. (The Triton kernels never load such slots.)
        stored = to_cache(new.nan_to_num(0.0, 0.0, 0.0), cache.dtype)
        if cache.dtype == FP8_KV_DTYPE:  # torch copies 8-bit floats by index only as bytes
            cache, stored = cache.view(torch.uint8), stored.view(torch.uint8)
        cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, stored)


def gather_context(
    cache: torch.Tensor, block_table: torch.Tensor, length: int, first_block: int = 0
) -> torch.Tensor:
    """Keys (or values) of one sequence from its block ``first_block`` on, [length - first_block *
    block_size, kv_heads, dim], read through its block table."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = cache.index_select(0, block_table[first_block:num_blocks])
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[: length - first_block * block_size]


def window_start_block(first_query: int, window: int, block_size: int) -> int:
    """The first block a sliding-window layer's query at ``first_query`` (and any after it) sees.

    Blocks before it are never read: behind every window they may already be another request's
    (``KVCacheManager.release_out_of_window``), and whatever they hold, NaN included, must not
    reach a masked-out score."""
    return max(first_query - window + 1, 0) // block_size


def _visible(q_len: int, seq_len: int, window: int, device: torch.device, first_key: int = 0) -> torch.Tensor:
    """[q_len, seq_len - first_key]: the keys from ``first_key`` on each query row sees. Query
    row j sits at position seq_len - q_len + j and sees keys up to there, and, with ``window``,
    none as far back as ``window`` positions."""
    rows = torch.arange(q_len, device=device).unsqueeze(1) + (seq_len - q_len)
    keys = torch.arange(first_key, seq_len, device=device).unsqueeze(0)
    if window:
        return (keys <= rows) & (keys > rows - window)
    return keys <= rows


def _attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """Softmax attention of ``[batch, heads, q, dim]`` queries over ``[batch, kv_heads, k, dim]``
    keys and values (``mask``: True where a query sees a key). ``softcap`` > 0 caps the scaled
    scores at ``softcap * tanh(score / softcap)`` before the mask, as Gemma 2 does; SDPA has no such
    cap, so those layers run the math in float32 here. Keys and values read from an 8-bit cache
    are widened to the queries' dtype."""
    keys, values = keys.to(query.dtype), values.to(query.dtype)
    if not softcap:
        return F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, is_causal=is_causal, scale=scale,
            enable_gqa=query.shape[1] != keys.shape[1],
        )  # fmt: skip
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:  # only ever asked for a fresh prompt, whose queries are its keys
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), values.float()).to(query.dtype)


# What one more group costs a step (a gather and an attention call per layer), in bytes of K/V
# gathered: sequences are split into groups only where padding them together would copy more than
# that. Measured as 256 tokens of 3 KV heads of 64 float32 values, keys and values (BENCHMARKS.md);
# the call's cost is about fixed, so a model with wider K/V rows splits sooner.
GROUP_COST_BYTES = 256 * 3 * 64 * 4 * 2


def group_cost_tokens(cache: torch.Tensor) -> int:
    """``GROUP_COST_BYTES`` in context tokens of ``cache`` ([blocks, block_size, kv_heads, dim]):
    a token's key and value rows."""
    row_bytes = cache.shape[2] * cache.shape[3] * cache.element_size() * 2
    return max(1, GROUP_COST_BYTES // row_bytes)


def length_groups(lengths: Sequence[int], group_cost: int) -> list[list[int]]:
    """The indices of ``lengths`` in groups of neighbouring lengths, shortest first, each to be
    padded to its longest: the cut that pads least, counting ``group_cost`` tokens for each group
    (the fewest of ``size * longest + group_cost`` summed over the groups, by dynamic programming
    over the sorted lengths). One long context among short ones is split off; similar lengths stay
    in one group."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    ordered = np.array([lengths[i] for i in order], dtype=np.int64)
    if not order:
        return []
    if len(order) == 1 or len(order) * int(ordered[-1]) - int(ordered.sum()) <= group_cost:
        return [order]  # padding everything costs less than a second group
    starts = np.arange(len(order), dtype=np.int64)
    best = np.zeros(len(order) + 1, dtype=np.int64)  # best[j]: the least cost of the first j
    cut = [0] * (len(order) + 1)  # cut[j]: where the last group of that best starts
    for end in range(1, len(order) + 1):
        costs = best[:end] + (end - starts[:end]) * ordered[end - 1] + group_cost
        cut[end] = int(costs.argmin())
        best[end] = costs[cut[end]]
    groups, end = [], len(order)
    while end:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


# Steps whose sequences each run at most this many query tokens attend as one padded batch (per
# group of similar lengths) rather than sequence by sequence: padding a few query rows costs less
# than a gather and an SDPA call per sequence.
MAX_PADDED_QUERY = 16


def _gather_padded(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """Every sequence's keys (or values), [seqs, kv_heads, max_len, dim]: read through its block
    table, past its own length whatever its table's padding blocks hold (to be masked)."""
    num_seqs, block_size = block_tables.shape[0], cache.shape[1]
    table = block_tables[:, : -(-max_len // block_size)].reshape(-1)
    gathered = cache.index_select(0, table).view(num_seqs, -1, cache.shape[2], cache.shape[3])
    return gathered[:, :max_len].transpose(1, 2)


@dataclass(frozen=True)
class _PaddedContext:
    """A group's keys and values, [seqs, kv_heads, ctx, dim], and each column's position in its
    sequence, [seqs, ctx] (or [ctx], the same for all, when gathered from position 0)."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor


def _padded_context(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_lens: torch.Tensor | int,
    max_q: int,
    max_len: int,
    window: int,
) -> _PaddedContext:
    """The contexts a group's queries attend over: from position 0, or, for a sliding-window
    layer whose window is shorter than the longest context, only each sequence's blocks from its
    window's start (``window_start_block``): fewer bytes copied, and no block behind a window read
    (even where the window's blocks are as many as the context's, a context past the window may
    have given back its first ones)."""
    block_size = k_cache.shape[1]
    if not window or max_len <= window:
        positions = torch.arange(max_len, device=seq_lens.device)
        keys = _gather_padded(k_cache, block_tables, max_len)
        return _PaddedContext(keys, _gather_padded(v_cache, block_tables, max_len), positions)
    # The most blocks one sequence's window can touch: its queries' span plus the window, unaligned.
    window_blocks = min((window + max_q - 2) // block_size + 2, -(-max_len // block_size))
    first = (seq_lens - query_lens - window + 1).clamp(min=0) // block_size
    columns = first.unsqueeze(1) + torch.arange(window_blocks, device=seq_lens.device)
    # Columns past a table's last are padding, as past a sequence's length: masked.
    table = block_tables.gather(1, columns.clamp(max=block_tables.shape[1] - 1)).reshape(-1)
    num_seqs = block_tables.shape[0]

    def gathered(cache: torch.Tensor) -> torch.Tensor:
        rows = cache.index_select(0, table).view(num_seqs, -1, cache.shape[2], cache.shape[3])
        return rows.transpose(1, 2)

    offsets = torch.arange(window_blocks * block_size, device=seq_lens.device)
    return _PaddedContext(gathered(k_cache), gathered(v_cache), first.unsqueeze(1) * block_size + offsets)


def _padded_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_len: int,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """One query token per sequence against its context (its last ``window`` tokens where that is
    set), gathered into a batch padded to ``max_len`` (or to a window's blocks)."""
    context = _padded_context(k_cache, v_cache, block_tables, seq_lens, 1, 1, max_len, window)
    positions = context.positions
    mask = positions < seq_lens.unsqueeze(1)  # [seqs, ctx]
    if window:
        mask &= positions >= seq_lens.unsqueeze(1) - window
    out = _attention(
        q.unsqueeze(2), context.keys, context.values, mask[:, None, None, :], scale, softcap
    )  # q: [seqs, heads, 1, dim]
    return out.squeeze(2)


@dataclass(frozen=True)
class _QueryGroup:
    """Sequences of similar context length whose few query tokens attend as one padded batch."""

    seqs: torch.Tensor  # [n] the sequences' indices in the step
    max_len: int  # the longest context among them
    query_rows: torch.Tensor  # [n, max_q] each one's query tokens' rows in q (its last repeated)
    query_lens: torch.Tensor  # [n]
    kept: torch.Tensor  # rows of the padded output, [n * max_q], that are real query tokens
    out_rows: torch.Tensor  # ... and their rows in the step's output


def _padded_queries(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    group: _QueryGroup,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """A group's query tokens over their contexts, causal (each sees its context up to its own
    position, within ``window`` where set); returns the real query rows in ``group.out_rows``'
    order. Padding rows repeat a sequence's last query and are dropped."""
    num_seqs, max_q = group.query_rows.shape
    context = _padded_context(
        k_cache, v_cache, block_tables, seq_lens, group.query_lens, max_q, group.max_len, window
    )
    query = q.index_select(0, group.query_rows.reshape(-1)).view(num_seqs, max_q, q.shape[1], q.shape[2])
    # Query j of a sequence sits at position seq_len - query_len + j.
    positions = context.positions if context.positions.dim() == 1 else context.positions.unsqueeze(1)
    rows = (seq_lens - group.query_lens).unsqueeze(1) + torch.arange(max_q, device=q.device)
    mask = positions <= rows.unsqueeze(2)  # [seqs, max_q, ctx]
    if window:
        mask &= positions > rows.unsqueeze(2) - window
    out = _attention(
        query.transpose(1, 2), context.keys, context.values, mask.unsqueeze(1), scale, softcap
    )  # [seqs, heads, max_q, dim]
    return out.transpose(1, 2).reshape(num_seqs * max_q, q.shape[1], q.shape[2]).index_select(0, group.kept)


class TorchAttentionBackend:
    name = "torch"

    def __init__(self) -> None:
        # Each plan is the same for every layer of a step: made once per metadata object (and
        # group cost, which the cache's row width sets).
        self._plan_for: tuple[AttentionMetadata | None, int] = (None, 0)
        self._plan: list[tuple[torch.Tensor, int]] = []
        self._query_plan_for: tuple[AttentionMetadata | None, int] = (None, 0)
        self._query_plan: list[_QueryGroup] = []

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
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        # Fresh prompts attend over this step's k and v directly, without reading them back (as
        # an 8-bit cache would give them back, so that they see what a later step will).
        new_kv = (as_read_back(k, k_cache.dtype), as_read_back(v, v_cache.dtype))
        return self._attend(q, new_kv, k_cache, v_cache, meta, scale, window, softcap)

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
        return self._attend(q, None, k_cache, v_cache, meta, scale, window, softcap)

    def _attend(
        self,
        q: torch.Tensor,
        new_kv: tuple[torch.Tensor, torch.Tensor] | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int,
        softcap: float,
    ) -> torch.Tensor:
        """The step's attention by its shape; ``new_kv``: its k and v, for fresh prompts to read."""
        if meta.is_pure_decode:
            return self._decode(q, k_cache, v_cache, meta, scale, window, softcap)
        if meta.max_query_len <= MAX_PADDED_QUERY:
            return self._short_queries(q, k_cache, v_cache, meta, scale, window, softcap)
        return self._varlen(q, new_kv, k_cache, v_cache, meta, scale, window, softcap)

    def _decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        groups = self._decode_groups(meta, group_cost_tokens(k_cache))
        if len(groups) == 1:
            tables, lens = meta.block_tables, meta.seq_lens
            return _padded_decode(q, k_cache, v_cache, tables, lens, groups[0][1], scale, window, softcap)
        out = torch.empty_like(q)
        for rows, max_len in groups:
            out[rows] = _padded_decode(
                q[rows],
                k_cache,
                v_cache,
                meta.block_tables[rows],
                meta.seq_lens[rows],
                max_len,
                scale,
                window,
                softcap,
            )
        return out

    def _short_queries(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        for group in self._query_groups(meta, group_cost_tokens(k_cache)):
            attended = _padded_queries(
                q,
                k_cache,
                v_cache,
                meta.block_tables[group.seqs],
                meta.seq_lens[group.seqs],
                group,
                scale,
                window,
                softcap,
            )
            out.index_copy_(0, group.out_rows, attended)
        return out

    def _query_groups(self, meta: AttentionMetadata, cost: int) -> list[_QueryGroup]:
        """Sequences of like query lengths (1, 2-3, 4-7, 8-15, 16: a decode row never pads to a
        prompt's 16), each class cut by context length as decode steps are, each group's query
        rows padded to its most query tokens."""
        if self._query_plan_for[0] is meta and self._query_plan_for[1] == cost:
            return self._query_plan
        starts = [0]
        for n in meta.query_lens_host:
            starts.append(starts[-1] + n)
        device = meta.seq_lens.device
        classes: dict[int, list[int]] = {}
        for seq, n in enumerate(meta.query_lens_host):
            classes.setdefault(n.bit_length(), []).append(seq)
        plan = []
        for members in classes.values():
            contexts = [meta.seq_lens_host[seq] for seq in members]
            for cut in length_groups(contexts, cost):
                chunk = [members[i] for i in cut]
                plan.append(self._query_group(meta, chunk, starts, device))
        self._query_plan_for, self._query_plan = (meta, cost), plan
        return plan

    @staticmethod
    def _query_group(
        meta: AttentionMetadata, chunk: list[int], starts: list[int], device: torch.device
    ) -> _QueryGroup:
        """Sequences ``chunk`` (sorted by context length) as one padded group."""
        lens = [meta.query_lens_host[i] for i in chunk]
        max_q = max(lens)
        query_rows = [
            [starts[i] + min(j, n - 1) for j in range(max_q)] for i, n in zip(chunk, lens, strict=True)
        ]
        kept = [r * max_q + j for r, n in enumerate(lens) for j in range(n)]
        out_rows = [starts[i] + j for i, n in zip(chunk, lens, strict=True) for j in range(n)]
        return _QueryGroup(
            seqs=torch.tensor(chunk, dtype=torch.long, device=device),
            max_len=meta.seq_lens_host[chunk[-1]],
            query_rows=torch.tensor(query_rows, dtype=torch.long, device=device),
            query_lens=torch.tensor(lens, dtype=torch.long, device=device),
            kept=torch.tensor(kept, dtype=torch.long, device=device),
            out_rows=torch.tensor(out_rows, dtype=torch.long, device=device),
        )

    def _decode_groups(self, meta: AttentionMetadata, cost: int) -> list[tuple[torch.Tensor, int]]:
        """Sequences sorted by length and cut into groups (``length_groups``), each padded only to
        its own longest.

        Gathering the paged cache into a padded batch dominates CPU decode; with ragged lengths,
        padding everything to the longest sequence copies about twice the bytes needed, and one
        long context among short ones many times that. ``cost``: a group's, in context tokens.
        """
        if self._plan_for[0] is meta and self._plan_for[1] == cost:
            return self._plan
        lengths = meta.seq_lens_host
        plan = []
        for chunk in length_groups(lengths, cost):
            rows = torch.tensor(chunk, dtype=torch.long, device=meta.seq_lens.device)
            plan.append((rows, lengths[chunk[-1]]))
        self._plan_for, self._plan = (meta, cost), plan
        return plan

    def _varlen(
        self,
        q: torch.Tensor,
        new_kv: tuple[torch.Tensor, torch.Tensor] | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        """Each sequence's query rows over its context: causal, and within ``window`` positions of
        each row where that is set (0: none)."""
        out = torch.empty_like(q)
        start = 0
        # Every tensor gets a batch axis of one: with three dimensions scaled_dot_product_attention
        # takes its math path on the CPU, with four its flash kernel (3x to 6x faster at 256 to
        # 2,048 tokens, BENCHMARKS.md).
        for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host, strict=True)):
            query = q[start : start + q_len].transpose(0, 1)[None]  # [1, heads, q_len, dim]
            sliding = bool(window) and seq_len > window
            if q_len == seq_len and new_kv is not None:
                # A fresh prompt: its keys are exactly this step's, no cache read (and, unless the
                # window cuts in, no mask) needed.
                keys = new_kv[0][start : start + q_len].transpose(0, 1)[None]
                values = new_kv[1][start : start + q_len].transpose(0, 1)[None]
                mask = _visible(q_len, seq_len, window, q.device) if sliding else None
            else:
                first = window_start_block(seq_len - q_len, window, k_cache.shape[1]) if sliding else 0
                table = meta.block_tables[i]
                keys = gather_context(k_cache, table, seq_len, first).transpose(0, 1)[None]
                values = gather_context(v_cache, table, seq_len, first).transpose(0, 1)[None]
                first_key = first * k_cache.shape[1]
                mask = _visible(q_len, seq_len, window if sliding else 0, q.device, first_key)
            attended = _attention(
                query, keys, values, mask, scale, softcap, is_causal=mask is None and q_len > 1
            )
            out[start : start + q_len] = attended[0].transpose(0, 1)
            start += q_len
        return out
