"""The PyTorch attention backend on the CPU: prompt attention takes SDPA's flash kernel, not its math path."""

from __future__ import annotations

import itertools

import pytest
import torch

from inferd.attention import torch_backend
from inferd.attention.base import AttentionMetadata
from inferd.attention.torch_backend import TorchAttentionBackend, group_cost_tokens, length_groups, write_kv

BLOCK_SIZE, HEADS, KV_HEADS, DIM = 4, 6, 2, 16


def _reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, context: int) -> torch.Tensor:
    """Causal attention of `q` (the last tokens) over `keys`/`values` of `context + len(q)` tokens."""
    group = HEADS // KV_HEADS
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, keys) * DIM**-0.5
    q_pos = torch.arange(context, context + q.shape[0])
    scores = scores.masked_fill(
        torch.arange(keys.shape[0])[None, None, :] > q_pos[None, :, None], float("-inf")
    )
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


def test_prompts_take_the_flash_kernel_and_match_the_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    context_lens, query_lens = [0, 13], [9, 7]  # a fresh prompt, and a chunk after 13 cached tokens
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    num_blocks = sum(-(-n // BLOCK_SIZE) for n in seq_lens)
    k_cache = torch.zeros(num_blocks, BLOCK_SIZE, KV_HEADS, DIM)
    v_cache = torch.zeros_like(k_cache)
    tables = torch.arange(num_blocks, dtype=torch.int32).flip(0)  # blocks in reverse order
    first = -(-seq_lens[0] // BLOCK_SIZE)
    block_tables = torch.zeros(2, num_blocks, dtype=torch.int32)
    block_tables[0, :first] = tables[:first]
    block_tables[1, : num_blocks - first] = tables[first:]
    # The second sequence's context is already in the cache.
    all_k = [torch.randn(n, KV_HEADS, DIM, generator=gen) for n in seq_lens]
    all_v = [torch.randn(n, KV_HEADS, DIM, generator=gen) for n in seq_lens]
    for pos in range(context_lens[1]):
        block, offset = int(block_tables[1, pos // BLOCK_SIZE]), pos % BLOCK_SIZE
        k_cache[block, offset], v_cache[block, offset] = all_k[1][pos], all_v[1][pos]
    slots = [
        int(block_tables[i, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE
        for i in range(2)
        for pos in range(context_lens[i], seq_lens[i])
    ]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor([0, query_lens[0], sum(query_lens)], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_host=tuple(query_lens),
        seq_lens_host=tuple(seq_lens),
    )
    q = torch.randn(sum(query_lens), HEADS, DIM, generator=gen)
    k = torch.cat([all_k[i][context_lens[i] :] for i in range(2)])
    v = torch.cat([all_v[i][context_lens[i] :] for i in range(2)])
    with torch.profiler.profile() as profile:
        out = TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, DIM**-0.5)
    ops = {event.key for event in profile.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops
    for i, start in enumerate((0, query_lens[0])):
        expected = _reference(q[start : start + query_lens[i]], all_k[i], all_v[i], context_lens[i])
        torch.testing.assert_close(out[start : start + query_lens[i]], expected, atol=1e-5, rtol=1e-5)


def _ragged_step(query_lens: list[int], context_lens: list[int], gen: torch.Generator):
    """A step of sequences with those query and cached-context lengths: caches holding every
    context and the step's K/V already written, its metadata, and q."""
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    blocks = [-(-n // BLOCK_SIZE) for n in seq_lens]
    k_cache = torch.randn(sum(blocks) + 1, BLOCK_SIZE, KV_HEADS, DIM, generator=gen)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(sum(blocks), generator=gen) + 1  # block 0 is never anyone's
    block_tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    at = 0
    for i, n in enumerate(blocks):
        block_tables[i, :n] = order[at : at + n]
        at += n
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64),
        query_start_loc=torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_host=tuple(query_lens),
        seq_lens_host=tuple(seq_lens),
    )
    q = torch.randn(sum(query_lens), HEADS, DIM, generator=gen)
    return q, k_cache, v_cache, meta


@pytest.mark.parametrize("window", [0, 6])
def test_few_query_tokens_a_sequence_attend_padded_as_sequence_by_sequence(monkeypatch, window: int) -> None:
    """Speculative decoding's steps (a token and its guesses a sequence), with decode rows and
    short prompts among them, in several groups of context lengths: the padded batch gives what
    attending one sequence at a time gives."""
    gen = torch.Generator().manual_seed(1)
    query_lens = [1, 5, 3, 16, 1, 9, 2, 4] * 4
    context_lens = [int(n) for n in torch.randint(0, 40, (len(query_lens),), generator=gen)]
    context_lens[3] = 0  # a fresh prompt of 16 tokens
    q, k_cache, v_cache, meta = _ragged_step(query_lens, context_lens, gen)
    backend = TorchAttentionBackend()
    # These short contexts in several groups too: a group costs 8 tokens of this cache's K/V.
    monkeypatch.setattr(torch_backend, "GROUP_COST_BYTES", 8 * KV_HEADS * DIM * 4 * 2)
    assert group_cost_tokens(k_cache) == 8
    classes = {n.bit_length() for n in query_lens}
    assert len(backend._query_groups(meta, 8)) > len(classes)
    expected = backend._varlen(q, None, k_cache, v_cache, meta, DIM**-0.5, window)

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("attended sequence by sequence")

    monkeypatch.setattr(backend, "_varlen", refuse)
    out = backend.attend(q, k_cache, v_cache, meta, DIM**-0.5, window)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _padding_cost(lengths: list[int], groups: list[list[int]], group_cost: int) -> int:
    return sum(len(g) * max(lengths[i] for i in g) + group_cost for g in groups)


def test_decode_groups_pad_least_for_what_a_group_costs() -> None:
    """One long context among short ones gets a group of its own (padding the short ones to it
    would copy thousands of tokens each); similar lengths stay in one group; and the cut is the
    cheapest of all cuts of the sorted lengths."""
    assert length_groups([64] * 8 + [6000], 256) == [list(range(8)), [8]]
    assert length_groups([200, 190, 210, 205], 256) == [[1, 0, 3, 2]]
    assert length_groups([], 256) == [] and length_groups([5], 256) == [[0]]
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        lengths = [int(n) for n in torch.randint(1, 3000, (8,), generator=gen)]
        groups = length_groups(lengths, 256)
        assert sorted(i for g in groups for i in g) == list(range(8))
        order = sorted(range(8), key=lengths.__getitem__)
        cheapest = min(
            _padding_cost(lengths, [order[a:b] for a, b in itertools.pairwise((0, *cuts, 8))], 256)
            for k in range(8)
            for cuts in itertools.combinations(range(1, 8), k)
        )
        assert _padding_cost(lengths, groups, 256) == cheapest, (trial, lengths)


@pytest.mark.parametrize("window", [0, 6])
def test_one_long_context_decodes_in_its_own_group_as_sequence_by_sequence(window: int) -> None:
    """At the default cost: eight short contexts and a long one make two decode groups, whose
    padded batches give what attending one sequence at a time gives."""
    gen = torch.Generator().manual_seed(2)
    context_lens = [63] * 8 + [3000]
    q, k_cache, v_cache, meta = _ragged_step([1] * 9, context_lens, gen)
    backend = TorchAttentionBackend()
    groups = backend._decode_groups(meta, group_cost_tokens(k_cache))
    assert [rows.tolist() for rows, _ in groups] == [list(range(8)), [8]]
    expected = backend._varlen(q, None, k_cache, v_cache, meta, DIM**-0.5, window)
    out = backend.attend(q, k_cache, v_cache, meta, DIM**-0.5, window)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_decode_rows_are_not_padded_to_a_prompts_query_tokens() -> None:
    """Seven decode rows and a 16-token prompt over equal contexts: one group by context alone, but
    the decode rows would pad to 16 query rows each; query lengths of unlike classes are apart."""
    gen = torch.Generator().manual_seed(3)
    q, k_cache, v_cache, meta = _ragged_step([1] * 7 + [16], [40] * 8, gen)
    backend = TorchAttentionBackend()
    groups = backend._query_groups(meta, group_cost_tokens(k_cache))
    assert sorted(group.seqs.tolist() for group in groups) == [list(range(7)), [7]]
    expected = backend._varlen(q, None, k_cache, v_cache, meta, DIM**-0.5)
    torch.testing.assert_close(
        backend.attend(q, k_cache, v_cache, meta, DIM**-0.5), expected, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    ("query_lens", "context_lens"),
    [
        ([1] * 6, [37, 80, 22, 61, 3, 120]),
        ([1, 5, 3, 16, 2, 4], [37, 80, 22, 61, 3, 120]),
        ([1, 40, 3, 24, 1, 2], [37, 80, 22, 61, 3, 120]),
        # Contexts just past the window: its blocks are as many as theirs, yet the first are behind.
        ([1] * 4, [11, 13, 14, 9]),
    ],
    ids=["decode", "short-queries", "sequence-by-sequence", "decode-just-past-the-window"],
)
def test_a_sliding_window_reads_no_block_behind_its_window(
    query_lens: list[int], context_lens: list[int]
) -> None:
    """Blocks behind every query's window may already be another request's (a sliding-window
    model's requests give them back): filled with NaN, they change nothing, on every path."""
    gen = torch.Generator().manual_seed(3)
    window = 10
    q, k_cache, v_cache, meta = _ragged_step(query_lens, context_lens, gen)
    backend = TorchAttentionBackend()
    expected = backend.attend(q, k_cache, v_cache, meta, DIM**-0.5, window)
    poisoned = 0
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host, strict=True)):
        behind = torch_backend.window_start_block(seq_len - q_len, window, BLOCK_SIZE)
        for block in meta.block_tables[i, :behind].tolist():
            k_cache[block] = float("nan")
            v_cache[block] = float("nan")
            poisoned += 1
    assert poisoned >= 2
    out = TorchAttentionBackend().attend(q, k_cache, v_cache, meta, DIM**-0.5, window)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("query_lens", "window"), [([1] * 12, 0), ([1] * 12, 6), ([1, 3, 2, 5] * 3, 0)])
def test_what_earlier_requests_left_in_a_block_never_reaches_an_output(
    query_lens: list[int], window: int
) -> None:
    """A padded batch reads whole blocks: the slots past a sequence's length (and the padding
    blocks of its table) hold what an earlier request wrote there. A broken request's NaN or
    infinite K/V must not reach another sequence's output through the masked weights."""
    gen = torch.Generator().manual_seed(3)
    context_lens = [int(n) for n in torch.randint(1, 40, (len(query_lens),), generator=gen)]
    q, k_cache, v_cache, meta = _ragged_step(query_lens, context_lens, gen)
    clean = TorchAttentionBackend().attend(q, k_cache, v_cache, meta, DIM**-0.5, window)
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for table, seq_len in zip(meta.block_tables, meta.seq_lens_host, strict=True):
        for position in range(seq_len):
            written[int(table[position // BLOCK_SIZE]), position % BLOCK_SIZE] = True
    stale = (~written).flatten().nonzero().flatten()
    broken = torch.full((len(stale), KV_HEADS, DIM), float("nan"))
    write_kv(broken, torch.full_like(broken, float("inf")), k_cache, v_cache, stale)
    out = TorchAttentionBackend().attend(q, k_cache, v_cache, meta, DIM**-0.5, window)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, clean, atol=1e-5, rtol=1e-5)
