"""Maps requests to KV blocks: allocation, prefix-cache lookup and registration, freeing."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Iterator, Sequence

from inferd.kv.block_pool import BlockPool

_ROOT_HASH = 0x5EED
# A key is the first 128 bits of a SHA-256 digest: no accidental collision in any cache's life.
_KEY_BYTES = 16


def _digest(parent: int, payload: bytes) -> int:
    digest = hashlib.sha256(parent.to_bytes(_KEY_BYTES, "little"))
    digest.update(payload)
    return int.from_bytes(digest.digest()[:_KEY_BYTES], "little")


def block_hash(parent: int, block_token_ids: Sequence[int]) -> int:
    """A full block's key: the previous block's key chained with this block's token ids.

    A cryptographic hash, not Python's: a prompt whose block key equals another's is served that
    block's K/V, so a key anyone could aim at (the built-in hash of ints can be solved for) would let
    one user's prompt read or poison another's context. Its cost: BENCHMARKS.md, "Prefix-cache keys"."""
    return _digest(parent, array("q", block_token_ids).tobytes())


def prefix_root(salt: str | None) -> int:
    """The key a request's chain of block keys starts from: the same for every request of the base
    model; another for each salt (a LoRA adapter, whose K/V differ for the same tokens, or a
    request's ``cache_salt``, which shares blocks only with requests giving the same one)."""
    return _ROOT_HASH if salt is None else _digest(_ROOT_HASH, salt.encode("utf-8", "surrogatepass"))


class BlockKeys:
    """A request's keys of its full blocks, each hashed once and kept: its tokens there never
    change, and a request is looked up again when its admission waits for blocks or after a
    preemption (a long prompt's keys would otherwise be hashed again each time)."""

    def __init__(self, salt: str | None) -> None:
        self.salt = salt
        self._keys: list[int] = []

    def first(self, token_ids: Sequence[int], block_size: int, num_blocks: int) -> Iterator[int]:
        """The keys of the first ``num_blocks`` full blocks of ``token_ids``, hashing only those
        not hashed before, one at a time (a lookup that misses stops hashing there)."""
        for i in range(num_blocks):
            if i == len(self._keys):
                parent = self._keys[-1] if self._keys else prefix_root(self.salt)
                self._keys.append(block_hash(parent, token_ids[i * block_size : (i + 1) * block_size]))
            yield self._keys[i]

    def hashed(self, index: int) -> int | None:
        """Full block ``index``'s key where it was hashed already, else None."""
        return self._keys[index] if index < len(self._keys) else None


def kv_window(layer_windows: Sequence[int]) -> int:
    """How far back any layer reads a context's keys, where every layer has a window (the widest
    one's), else 0: some layer reads the whole context."""
    if not layer_windows or not all(layer_windows):
        return 0
    return max(layer_windows)


class KVCacheManager:
    """Owns the block pool; takes plain request ids and token ids, returns block ids.

    With ``window`` (a model whose every layer is a sliding-window one, ``kv_window``), blocks no
    later query can see go back to the pool as a request advances (``release_out_of_window``): its
    table keeps their ids, so positions still map to table entries, but the attention backends read
    a sliding-window layer's keys from its window's first block on (the Triton kernels from the
    window's first key, the PyTorch backend's gathers from ``window_start_block``), never what
    another request may have written there since."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, window: int = 0
    ) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, block_size)
        self.enable_prefix_caching = enable_prefix_caching
        self.window = window
        self._blocks: dict[str, list[int]] = {}
        self._hashes: dict[str, list[int]] = {}  # hashes of the request's registered full blocks
        # How many of a request's first blocks went back to the pool, out of every layer's window;
        # of those, how many it never held (a prefix hit found past an evicted head).
        self._released: dict[str, int] = {}
        self._unheld: dict[str, int] = {}
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    def block_table(self, request_id: str) -> list[int]:
        return self._blocks.get(request_id, [])

    def usage(self) -> float:
        return self.pool.usage()

    def reset_prefix_cache(self) -> int:
        """Forgets every cached prefix (vLLM's /reset_prefix_cache: a benchmark's runs start cold);
        the requests running keep their blocks. Returns the blocks that were indexed."""
        return self.pool.reset_prefix_cache()

    def find_cached_prefix(
        self,
        request_id: str,
        token_ids: Sequence[int],
        salt: str | None = None,
        keys: BlockKeys | None = None,
        record: bool = True,
    ) -> int:
        """Attach the longest cached prefix of ``token_ids`` to a request with no blocks yet
        (``salt``: its LoRA adapter, whose blocks are its own).

        Returns the number of tokens whose KV is already computed. At least one token is always
        left to compute, because the model must produce logits for the last prompt token. With a
        window, only the blocks the first query to compute can see must be cached, and only those
        are held: the request starts with the rest released. ``keys``: the request's own, kept
        between its lookups (``salt`` is theirs). ``record`` false: the lookup is not counted in
        ``prefix_queries`` and ``prefix_hits`` (the scheduler counts a request's lookup once it is
        admitted, ``record_prefix_lookup``: one waiting for blocks is looked up each step).
        """
        if request_id in self._blocks:
            raise RuntimeError(f"request {request_id} already holds blocks")
        self._blocks[request_id] = []
        self._hashes[request_id] = []
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (len(token_ids) - 1) // self.block_size
        if keys is None:
            keys = BlockKeys(salt)
        assert keys.salt == salt, "a request's keys start from its own salt"
        wanted = keys.first(token_ids, self.block_size, max_blocks)
        if self.window:
            hashes, first_held = self._longest_windowed_hit(list(wanted))
        else:
            hashes, first_held = self._longest_hit(wanted), 0
        held = []
        for key in hashes[first_held:]:
            block_id = self.pool.lookup(key)
            assert block_id is not None, "a block found by the lookup just made"
            self.pool.touch(block_id)
            held.append(block_id)
        # The entries before the first held block are never read (out of every later query's
        # window): they stand in as released ones, under the first held block's id.
        self._blocks[request_id] = held[:1] * first_held + held
        self._hashes[request_id] = hashes
        if first_held:
            self._released[request_id] = self._unheld[request_id] = first_held
        num_hit_tokens = len(hashes) * self.block_size
        if record:
            self.record_prefix_lookup(len(token_ids), num_hit_tokens)
        return num_hit_tokens

    def record_prefix_lookup(self, num_queried: int, num_hit: int) -> None:
        """Counts one lookup of ``num_queried`` tokens that found ``num_hit`` cached."""
        if self.enable_prefix_caching:
            self.prefix_queries += num_queried
            self.prefix_hits += num_hit

    def _longest_hit(self, keys: Iterator[int]) -> list[int]:
        """Keys of the longest run of cached blocks from the head."""
        hashes = []
        for key in keys:
            if self.pool.lookup(key) is None:
                break
            hashes.append(key)
        return hashes

    def _longest_windowed_hit(self, keys: list[int]) -> tuple[list[int], int]:
        """For a model whose every layer slides (vLLM's sliding-window lookup): the keys of the
        longest prefix whose blocks that the first query after it can see are all cached (its last
        one at least), and the index of the first of those. Its head may have been evicted (a long
        request's head goes back to the pool behind the window while it runs); no later query reads
        it. A key still names its whole prefix, so a block found is the one computed after these very
        tokens."""
        run = 0  # cached blocks in a row, ending at block n - 1
        runs = []
        for key in keys:
            run = run + 1 if self.pool.lookup(key) is not None else 0
            runs.append(run)
        for num_blocks in range(len(keys), 0, -1):
            # The first query, at position num_blocks * block_size, sees keys from first_held's block
            # on (none before it with a window of 1: the last block is held all the same).
            first_held = max(0, (num_blocks * self.block_size - self.window + 1) // self.block_size)
            first_held = min(first_held, num_blocks - 1)
            if runs[num_blocks - 1] >= num_blocks - first_held:
                return keys[:num_blocks], first_held
        return [], 0

    def allocate(self, request_id: str, num_total_tokens: int) -> bool:
        """Grow the request's table to hold ``num_total_tokens``; False (nothing changed) if no room."""
        blocks = self._blocks.setdefault(request_id, [])
        self._hashes.setdefault(request_id, [])
        needed = -(-num_total_tokens // self.block_size) - len(blocks)
        if needed <= 0:
            return True
        new_blocks = self.pool.allocate(needed)
        if new_blocks is None:
            return False
        blocks.extend(new_blocks)
        return True

    def cache_computed_blocks(
        self,
        request_id: str,
        tokens_in_range: Callable[[int, int], Sequence[int]],
        num_computed: int,
        salt: str | None = None,
        keys: BlockKeys | None = None,
    ) -> None:
        """Register every block that is now full and computed, so later requests can reuse it.

        ``tokens_in_range(start, end)`` gives the request's token ids there; only the blocks that
        just filled are read, so a step that fills none costs nothing however long the context.
        ``keys``: the request's own, whose keys hashed already are read back, not hashed again.
        """
        if not self.enable_prefix_caching:
            return
        assert keys is None or keys.salt == salt, "a request's keys start from its own salt"
        hashes = self._hashes[request_id]
        num_full = num_computed // self.block_size
        if num_full <= len(hashes):
            return
        parent = hashes[-1] if hashes else prefix_root(salt)
        blocks = self._blocks[request_id]
        for i in range(len(hashes), num_full):
            known = keys.hashed(i) if keys is not None else None
            if known is None:
                known = block_hash(parent, tokens_in_range(i * self.block_size, (i + 1) * self.block_size))
            parent = known
            hashes.append(parent)
            self.pool.register_hash(blocks[i], parent)

    def release_out_of_window(self, request_id: str, next_position: int) -> int:
        """Give back the request's blocks whose every key is out of the window of any query at
        ``next_position`` or later (the first position no step has computed yet, or that a step in
        flight may still compute), keeping them in its table; returns how many went back. They go
        back as a finished request's do: a full block stays in the prefix cache until evicted."""
        blocks = self._blocks.get(request_id)
        if not self.window or blocks is None:
            return 0
        # A query at position p sees keys p - window + 1 .. p: block b holds keys up to
        # (b + 1) * block_size - 1, out of reach once that is below next_position - window + 1.
        reach = min((next_position - self.window + 1) // self.block_size, len(blocks))
        done = self._released.get(request_id, 0)
        if reach <= done:
            return 0
        self.pool.release(blocks[done:reach])
        self._released[request_id] = reach
        return reach - done

    def num_held(self, request_id: str) -> int:
        """Blocks the request holds: its table's, less those released out of the window."""
        return len(self._blocks.get(request_id, ())) - self._released.get(request_id, 0)

    def trim(self, request_id: str, num_tokens: int) -> bool:
        """Give back the request's blocks past its first ``num_tokens`` tokens (speculative
        decoding's rejected guesses': never full of computed tokens, so never in the prefix cache).
        Returns whether any went back."""
        blocks = self._blocks.get(request_id)
        keep = max(-(-num_tokens // self.block_size), self._released.get(request_id, 0))
        if blocks is None or len(blocks) <= keep:
            return False
        extra = blocks[keep:]
        del blocks[keep:]
        # Reused first: taken for guesses again, they need not evict a cached prefix.
        self.pool.release(extra, reuse_first=True)
        return True

    def free(self, request_id: str) -> None:
        """Release the request's blocks; tail blocks first so they are evicted before shared heads."""
        blocks = self._blocks.pop(request_id, [])
        self._hashes.pop(request_id, None)
        released = self._released.pop(request_id, 0)
        unheld = self._unheld.pop(request_id, 0)
        self.pool.release(list(reversed(blocks[released:])))
        # Blocks given back behind a sliding window went to the free list first, so they would be
        # evicted before the rest; a prefix is looked up from its head, which must outlast its tail.
        self.pool.move_to_back(list(reversed(blocks[unheld:released])))
