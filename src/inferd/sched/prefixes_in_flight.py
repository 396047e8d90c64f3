"""The prompt blocks that running requests are computing and have not cached yet.

Requests that share a prompt head and arrive together (the samples of an `n` > 1 request, a
system prompt many users send at once, a batch of offline prompts) all miss the prefix cache, since
no block of the head is cached yet, and each would compute it. The scheduler asks here instead
whether the next block a waiting request would compute is already being computed by a running one;
if so the waiting request waits for it to be cached (a step or a few) and then takes it from the
cache, as SGLang's scheduler holds back requests that share a prefix within a batch.
"""

from __future__ import annotations

from inferd.engine.request import Request


class PrefixesInFlight:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._owner: dict[int, str] = {}  # block key -> the running request computing it
        self._claimed: dict[str, list[int]] = {}  # request id -> the keys it owns

    def _num_full_prompt_blocks(self, request: Request) -> int:
        # As the prefix cache's lookup: a prompt's last token is always computed, never cached.
        return (len(request.all_token_ids) - 1) // self.block_size

    def is_computing(self, request: Request, num_cached: int) -> bool:
        """Whether a running request other than ``request`` is computing the block ``request``
        would compute first, having found ``num_cached`` tokens cached."""
        if not self._owner:
            return False
        index = num_cached // self.block_size
        if index >= self._num_full_prompt_blocks(request):
            return False
        assert request.block_keys is not None, "looked up in the prefix cache before"
        # The lookup that found num_cached hashed up to this block, its first miss.
        key = request.block_keys.hashed(index)
        if key is None:
            *_, key = request.block_keys.first(request.all_token_ids, self.block_size, index + 1)
        owner = self._owner.get(key)
        return owner is not None and owner != request.request_id

    def claim(self, request: Request, num_cached: int) -> None:
        """``request``, admitted with ``num_cached`` tokens found cached, computes its prompt's full
        blocks after them: those no other running request computes are its own until it is
        released."""
        first = num_cached // self.block_size
        num_full = self._num_full_prompt_blocks(request)
        if first >= num_full:
            return
        assert request.block_keys is not None, "looked up in the prefix cache before"
        # Every key of the prompt is hashed now; the cache's registration of the blocks as they
        # fill reads them back instead of hashing them again (`cache_computed_blocks`).
        keys = list(request.block_keys.first(request.all_token_ids, self.block_size, num_full))[first:]
        owned = [key for key in keys if self._owner.setdefault(key, request.request_id) == request.request_id]
        if owned:
            self._claimed[request.request_id] = owned

    def release(self, request_id: str) -> None:
        """``request_id`` computes no more of its prompt: it is done with it, preempted or finished."""
        for key in self._claimed.pop(request_id, ()):
            del self._owner[key]
