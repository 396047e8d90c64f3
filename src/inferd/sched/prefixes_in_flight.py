"""The prompt blocks that running requests are computing and have not cached yet.

Requests that share a prompt head and arrive together (the samples of an `n` > 1 request, a
system prompt many users send at once, a batch of offline prompts) all miss the prefix cache, since
no block of the head is cached yet, and each would compute it. The scheduler asks here instead
whether the next block a waiting request would compute is already being computed by a running one;
if so the waiting request waits until the blocks it shares with that one are cached, then takes
them from the cache, as SGLang's scheduler holds back requests that share a prefix within a batch.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from inferd.engine.request import Request


class PrefixesInFlight:
    def __init__(self, block_size: int, is_cached: Callable[[int], bool]) -> None:
        self.block_size = block_size
        self._is_cached = is_cached  # whether the prefix cache holds the block of a key
        self._owner: dict[int, Request] = {}  # block key -> the running request computing it
        self._claimed: dict[str, list[int]] = {}  # request id -> the keys it owns
        # Request id -> the key of the last block it shares with the request computing its next
        # one: until that block is cached (or nobody computes it), the request is passed over
        # without a lookup in the cache. Waiting for the next block alone would look it up again
        # after each chunk the other computes, and a burst of thousands sharing a head made every
        # step look each of them up.
        self._awaited: dict[str, int] = {}
        self.num_put_off = 0  # requests put off, each once per wait
        # A running request's prompt as int64 bytes, where requests waiting on it were compared.
        self._prompt_bytes: dict[str, bytes] = {}

    def _num_full_prompt_blocks(self, request: Request) -> int:
        # As the prefix cache's lookup: a prompt's last token is always computed, never cached.
        num_tokens = len(request.prompt_token_ids) + len(request.output_token_ids)
        return (num_tokens - 1) // self.block_size

    def still_put_off(self, request_id: str) -> bool:
        """Whether the block ``request_id`` waits for is still being computed, not cached."""
        key = self._awaited.get(request_id)
        return key is not None and key in self._owner and not self._is_cached(key)

    def put_off(self, request: Request, num_cached: int) -> bool:
        """Whether a running request other than ``request`` is computing the block ``request``
        would compute first, having found ``num_cached`` tokens cached; if so ``request`` waits
        for the blocks it shares with that one (``still_put_off``)."""
        if not self._owner:
            return False
        index = num_cached // self.block_size
        num_full = self._num_full_prompt_blocks(request)
        if index >= num_full:
            return False
        assert request.block_keys is not None, "looked up in the prefix cache before"
        # The lookup that found num_cached hashed up to this block, its first miss.
        key = request.block_keys.hashed(index)
        if key is None:
            *_, key = request.block_keys.first(request.all_token_ids, self.block_size, index + 1)
        owner = self._owner.get(key)
        if owner is None or owner is request:
            return False
        owner_bytes = self._prompt_bytes.get(owner.request_id)
        if owner_bytes is None:  # made once for all the requests waiting on the same one
            owner_bytes = self._prompt_bytes[owner.request_id] = _as_bytes(owner.prompt_token_ids)
        limit = min(num_full, self._num_full_prompt_blocks(owner)) * self.block_size
        shared = _shared_tokens(_as_bytes(request.prompt_token_ids[:limit]), owner_bytes, limit)
        last = shared // self.block_size - 1
        awaited = owner.block_keys.hashed(last) if owner.block_keys is not None and last > index else None
        self.num_put_off += request.request_id not in self._awaited
        self._awaited[request.request_id] = key if awaited is None or awaited not in self._owner else awaited
        return True

    def claim(self, request: Request, num_cached: int) -> None:
        """``request``, admitted with ``num_cached`` tokens found cached, computes its prompt's full
        blocks after them: those no other running request computes are its own until it is
        released."""
        self._awaited.pop(request.request_id, None)
        first = num_cached // self.block_size
        num_full = self._num_full_prompt_blocks(request)
        if first >= num_full:
            return
        assert request.block_keys is not None, "looked up in the prefix cache before"
        # Every key of the prompt is hashed now; the cache's registration of the blocks as they
        # fill reads them back instead of hashing them again (`cache_computed_blocks`).
        keys = list(request.block_keys.first(request.all_token_ids, self.block_size, num_full))[first:]
        owned = [key for key in keys if self._owner.setdefault(key, request) is request]
        if owned:
            self._claimed[request.request_id] = owned

    def release(self, request_id: str) -> None:
        """``request_id`` computes no more of its prompt: it is done with it, or preempted."""
        for key in self._claimed.pop(request_id, ()):
            del self._owner[key]
        self._prompt_bytes.pop(request_id, None)

    def forget(self, request_id: str) -> None:
        """``request_id`` finished: neither computing nor waiting."""
        self.release(request_id)
        self._awaited.pop(request_id, None)


def _as_bytes(token_ids: list[int]) -> bytes:
    return array("q", token_ids).tobytes()


def _shared_tokens(x: bytes, y: bytes, limit: int) -> int:
    """How many leading tokens the int64 bytes ``x`` and ``y`` share, up to ``limit``: found by
    halving, each comparison a memcmp (comparing two lists' ints one by one took 0.3 ms for a
    2,048-token head, for each of hundreds of requests in a step)."""
    low, high = 0, min(len(x) // 8, len(y) // 8, limit)  # the first `low` tokens are shared
    if x[: 8 * high] == y[: 8 * high]:
        return high
    while high - low > 1:  # and the first `high` are not
        middle = (low + high) // 2
        if x[: 8 * middle] == y[: 8 * middle]:
            low = middle
        else:
            high = middle
    return low
