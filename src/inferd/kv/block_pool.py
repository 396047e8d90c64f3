"""A fixed pool of KV blocks with reference counts, an LRU free list and a prefix-hash index."""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    """Hands out block ids; remembers which free blocks still hold a cached prefix.

    Free blocks sit in ``_free`` in eviction order (least recently freed first). A free block
    may still be indexed by its prefix hash: it is reused for a prefix hit until something needs
    the room, at which point it is evicted (its hash dropped) and handed out fresh.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # prefix hash -> block id
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, count: int) -> list[int] | None:
        """Take ``count`` fresh blocks, evicting cached ones LRU-first; None if there is no room."""
        if count > len(self._free):
            return None
        blocks = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            self._evict_hash(block_id)
            self._ref_counts[block_id] = 1
            blocks.append(block_id)
        return blocks

    def lookup(self, block_hash: int) -> int | None:
        return self._cached.get(block_hash)

    def touch(self, block_id: int) -> None:
        """Add a user to a cached block (a prefix hit), taking it off the free list if idle."""
        if self._ref_counts[block_id] == 0:
            del self._free[block_id]
        self._ref_counts[block_id] += 1

    def register_hash(self, block_id: int, block_hash: int) -> None:
        """Index a full, computed block by its prefix hash (first writer wins)."""
        if self._block_hash[block_id] is not None or block_hash in self._cached:
            return
        self._block_hash[block_id] = block_hash
        self._cached[block_hash] = block_id

    def release(self, block_ids: list[int], reuse_first: bool = False) -> None:
        """Drop one user from each block; idle blocks go to the back of the eviction order, or with
        ``reuse_first`` (blocks that hold nothing worth keeping) to its front, so they are taken
        before any block that still holds a cached prefix."""
        for block_id in block_ids:
            count = self._ref_counts[block_id] - 1
            if count < 0:
                raise RuntimeError(f"block {block_id} released more often than allocated")
            self._ref_counts[block_id] = count
            if count == 0:
                self._free[block_id] = None
                if reuse_first:
                    self._free.move_to_end(block_id, last=False)

    def move_to_back(self, block_ids: list[int]) -> None:
        """Put those of these blocks that are idle at the back of the eviction order, in the order
        given (the last evicted last)."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                self._free.move_to_end(block_id)

    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def reset_prefix_cache(self) -> int:
        """Forgets every cached prefix (blocks in use keep their K/V for their requests, but no
        later request finds them); returns how many blocks were indexed."""
        dropped = len(self._cached)
        self._cached.clear()
        self._block_hash = [None] * self.num_blocks
        return dropped

    def _evict_hash(self, block_id: int) -> None:
        block_hash = self._block_hash[block_id]
        if block_hash is not None:
            del self._cached[block_hash]
            self._block_hash[block_id] = None
            self.num_evictions += 1
