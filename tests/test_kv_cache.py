from __future__ import annotations

from collections.abc import Callable

import pytest

from inferd.kv.block_pool import BlockPool
from inferd.kv.manager import BlockKeys, KVCacheManager


def test_pool_allocates_and_refuses_when_full() -> None:
    pool = BlockPool(4, 16)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) is None
    assert pool.num_free == 1
    pool.release([1])
    assert pool.num_free == 2
    with pytest.raises(RuntimeError):
        pool.release([1])


def _slices(tokens: list[int]) -> Callable[[int, int], list[int]]:
    return lambda start, end: tokens[start:end]


def test_prefix_hit_reuses_blocks_and_leaves_last_token_to_compute() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4)
    prompt = list(range(12))
    assert kv.find_cached_prefix("a", prompt) == 0
    assert kv.allocate("a", 12)
    kv.cache_computed_blocks("a", _slices(prompt), 12)
    # Same 12 tokens: only 2 blocks may be reused, the last token must be computed again.
    assert kv.find_cached_prefix("b", prompt) == 8
    assert kv.block_table("b") == kv.block_table("a")[:2]
    assert kv.pool.ref_count(kv.block_table("a")[0]) == 2
    # A different second block stops the chain there.
    other = prompt[:4] + [99] * 8
    assert kv.find_cached_prefix("c", other) == 4


def test_freed_cached_blocks_are_reused_until_evicted_lru() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    first = [1, 2, 3, 4, 5]
    kv.find_cached_prefix("a", first)
    kv.allocate("a", 5)
    kv.cache_computed_blocks("a", _slices(first), 5)
    kv.free("a")
    assert kv.usage() == 0.0
    assert kv.pool.num_cached_blocks() == 2
    # Still cached after free: a new request hits.
    assert kv.find_cached_prefix("b", first) == 4
    kv.free("b")
    # A request needing every block evicts the cached ones.
    kv.find_cached_prefix("c", [7, 7, 7, 7, 7, 7, 7])
    assert kv.allocate("c", 8)
    assert kv.pool.num_cached_blocks() == 0
    assert kv.pool.num_evictions == 2


def test_eviction_prefers_least_recently_freed() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    for rid, tokens in (("a", [1, 1]), ("b", [2, 2])):
        kv.find_cached_prefix(rid, tokens)
        kv.allocate(rid, 2)
        kv.cache_computed_blocks(rid, _slices(tokens), 2)
        kv.free(rid)
    # Two never-cached blocks are handed out before any cached one...
    kv.find_cached_prefix("c", [5])
    kv.allocate("c", 4)
    assert kv.pool.num_cached_blocks() == 2
    # ...then the least recently freed cached block ("a"'s) goes first.
    kv.find_cached_prefix("d", [6])
    kv.allocate("d", 2)
    assert kv.find_cached_prefix("e", [1, 1, 9]) == 0
    assert kv.find_cached_prefix("f", [2, 2, 9]) == 2


def test_prefix_caching_off_never_hits() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    kv.find_cached_prefix("a", [1, 2, 3])
    kv.allocate("a", 3)
    kv.cache_computed_blocks("a", _slices([1, 2, 3]), 3)
    assert kv.find_cached_prefix("b", [1, 2, 3]) == 0


def test_block_keys_are_chained_sha256_digests() -> None:
    """Keys no prompt can be crafted to collide with: the first 128 bits of SHA-256 over the parent
    key and the block's token ids (int64, little-endian), chained from the root."""
    import hashlib
    import struct

    from inferd.kv.manager import block_hash, prefix_root

    def reference(parent: int, tokens: list[int]) -> int:
        payload = parent.to_bytes(16, "little") + struct.pack(f"<{len(tokens)}q", *tokens)
        return int.from_bytes(hashlib.sha256(payload).digest()[:16], "little")

    root = prefix_root(None)
    first = block_hash(root, [1, 2, 3, 4])
    assert first == reference(root, [1, 2, 3, 4])
    assert block_hash(first, [5, 6, 7, 8]) == reference(first, [5, 6, 7, 8])
    salted = hashlib.sha256(root.to_bytes(16, "little") + b"tenant-a").digest()[:16]
    assert prefix_root("tenant-a") == int.from_bytes(salted, "little")


def test_a_salt_shares_blocks_only_with_the_same_salt() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(9))
    kv.find_cached_prefix("a", prompt, salt="tenant-a")
    kv.allocate("a", 9)
    kv.cache_computed_blocks("a", _slices(prompt), 9, salt="tenant-a")
    assert kv.find_cached_prefix("b", prompt, salt="tenant-b") == 0
    assert kv.find_cached_prefix("c", prompt) == 0
    assert kv.find_cached_prefix("d", prompt, salt="tenant-a") == 8


def test_a_reset_forgets_every_prefix_and_leaves_held_blocks_to_their_requests() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(9))
    kv.find_cached_prefix("a", prompt)
    kv.allocate("a", 9)
    kv.cache_computed_blocks("a", _slices(prompt), 9)
    assert kv.find_cached_prefix("b", prompt) == 8
    kv.free("b")
    assert kv.reset_prefix_cache() == 2
    assert kv.find_cached_prefix("c", prompt) == 0 and kv.block_table("a")  # "a" keeps its blocks
    kv.free("c")
    kv.cache_computed_blocks("a", _slices(prompt + [9, 10, 11, 12]), 13)  # "a" goes on caching
    assert kv.find_cached_prefix("d", prompt + [9, 10, 11, 12, 13]) == 0  # its old blocks were forgotten


def test_a_window_gives_back_the_blocks_no_later_query_sees() -> None:
    """Window 10, blocks of 4: a query at position p sees keys p - 9 .. p, so once the next query
    is at 22, keys 0..12 are out of reach: blocks 0..2 (keys 0..11) go back, block 3 (12..15) stays.
    The table keeps their ids; freeing the request gives back only the rest."""
    kv = KVCacheManager(num_blocks=10, block_size=4, window=10)
    tokens = list(range(24))
    kv.find_cached_prefix("a", tokens)
    assert kv.allocate("a", 24)
    table = list(kv.block_table("a"))
    kv.cache_computed_blocks("a", _slices(tokens), 22)
    assert kv.release_out_of_window("a", 12) == 0  # keys 3.. still seen from 12
    assert kv.release_out_of_window("a", 22) == 3
    assert kv.release_out_of_window("a", 22) == 0  # nothing twice
    assert kv.block_table("a") == table and kv.num_held("a") == 3
    assert kv.pool.num_free == 10 - 3 and [kv.pool.ref_count(b) for b in table] == [0, 0, 0, 1, 1, 1]
    # Released full blocks stay in the prefix cache until evicted, as a finished request's do.
    assert kv.find_cached_prefix("b", tokens) == 20
    kv.free("b")
    # Trimming keeps at least the released entries (given back once, never twice).
    assert kv.trim("a", 4) and kv.block_table("a") == table[:3] and kv.num_held("a") == 0
    kv.free("a")
    assert kv.pool.num_free == 10


def test_without_a_window_nothing_goes_back_early() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4)
    kv.find_cached_prefix("a", list(range(24)))
    assert kv.allocate("a", 24)
    assert kv.release_out_of_window("a", 24) == 0 and kv.num_held("a") == 6


def test_the_window_to_release_by_is_the_widest_and_only_where_every_layer_has_one() -> None:
    from inferd.kv.manager import kv_window

    assert kv_window((8, 8, 8)) == 8 and kv_window((4, 16)) == 16
    assert kv_window((8, 0, 8)) == 0 and kv_window(()) == 0


def _compute_8_a_step(kv: KVCacheManager, request_id: str, prompt: list[int]) -> None:
    """A new request's prompt computed 8 tokens a step, as the scheduler drives the manager."""
    kv.find_cached_prefix(request_id, prompt)
    for computed in range(8, len(prompt) + 1, 8):
        assert kv.allocate(request_id, computed)
        kv.cache_computed_blocks(request_id, _slices(prompt), computed)
        kv.release_out_of_window(request_id, computed)


@pytest.mark.parametrize("window", [0, 8])
def test_a_freed_prefix_loses_its_tail_first_even_with_its_head_given_back_early(window: int) -> None:
    """A 40-token prompt computed 8 tokens a step in a pool of 10 blocks of 4; once it is freed and
    3 fresh blocks are taken, its first 7 blocks still answer a lookup, whether or not its head went
    back to the pool behind a window while it ran."""
    kv = KVCacheManager(num_blocks=10, block_size=4, window=window)
    prompt = list(range(40))
    _compute_8_a_step(kv, "a", prompt)
    kv.free("a")
    kv.find_cached_prefix("b", [99])
    assert kv.allocate("b", 12)  # evicts three cached blocks
    assert kv.find_cached_prefix("c", prompt) == 28


def test_a_window_finds_a_prefix_whose_head_was_evicted() -> None:
    """A 40-token prompt computed 8 tokens a step, its head going back behind a window of 8 as it
    runs; another request then takes 4 blocks, evicting the head's first two. Looked up again, the
    prompt's last two blocks (all the next query sees) are a hit of 40 tokens, held alone; a lookup
    from the head would find nothing."""
    kv = KVCacheManager(num_blocks=12, block_size=4, window=8)
    prompt = list(range(40))
    _compute_8_a_step(kv, "a", prompt)
    assert kv.find_cached_prefix("b", [99]) == 0 and kv.allocate("b", 16)
    kv.free("a")
    assert kv.pool.lookup(next(BlockKeys(None).first(prompt, 4, 1))) is None
    assert kv.find_cached_prefix("c", [*prompt, 7]) == 40 and kv.num_held("c") == 2
    assert kv.allocate("c", 41) and kv.pool.num_free == 12 - 4 - 3
    # c's new block was block 7, next to evict: 36 tokens would need blocks 7 and 8 (keys 29..35);
    # 28 need blocks 5 and 6 (keys 21..27), both there.
    assert kv.find_cached_prefix("d", prompt[:37]) == 28 and kv.num_held("d") == 2
    for request_id in ("b", "c", "d"):
        kv.free(request_id)
    assert kv.pool.num_free == 12 and all(kv.pool.ref_count(b) == 0 for b in range(12))


def test_a_window_falls_back_to_a_shorter_prefix_where_its_window_has_a_gap() -> None:
    """Window 8, blocks of 4: a 32-token prompt's head is evicted while it runs (another request
    takes its released blocks), and once it is freed its last two blocks are. A hit of 32 tokens
    needs blocks 6 and 7, one of 28 blocks 5 and 6: 24 needs blocks 4 and 5, both there. A lookup
    from the head would find nothing."""
    kv = KVCacheManager(num_blocks=10, block_size=4, window=8)
    prompt = list(range(32))
    _compute_8_a_step(kv, "a", prompt)  # blocks 0..5 released behind the window
    assert kv.find_cached_prefix("b", [99]) == 0 and kv.allocate("b", 16)  # 2 unused, then 0 and 1
    kv.free("a")
    assert kv.find_cached_prefix("c", [98]) == 0 and kv.allocate("c", 8)  # a's tail: 7, then 6
    keys = list(BlockKeys(None).first(prompt, 4, 8))
    assert [kv.pool.lookup(key) is not None for key in keys] == [
        False,
        False,
        True,
        True,
        True,
        True,
        False,
        False,
    ]
    assert kv.find_cached_prefix("d", [*prompt, 1]) == 24 and kv.num_held("d") == 2


def test_a_window_of_one_holds_the_last_block_of_a_hit() -> None:
    """A query that sees only itself needs no earlier keys: a hit still needs its last block cached
    (a cold cache finds nothing), and holds it, so the request's table has a real block."""
    kv = KVCacheManager(num_blocks=8, block_size=4, window=1)
    prompt = list(range(20))
    assert kv.find_cached_prefix("a", prompt) == 0
    assert kv.allocate("a", 20)
    kv.cache_computed_blocks("a", _slices(prompt), 20)
    kv.free("a")
    assert kv.find_cached_prefix("b", prompt) == 16 and kv.num_held("b") == 1
    assert kv.allocate("b", 20)
    kv.free("b")
    assert kv.pool.num_free == 8
