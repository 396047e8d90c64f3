"""Speculative decoding's guesses from a draft model: a smaller model of the same vocabulary
(vLLM's ``{"method": "draft_model", "model": ...}``; Qwen2.5-0.5B for Qwen2.5-7B, say) greedily
decodes each guessing request's next tokens, and the served model checks them in one step as it
checks prompt-lookup guesses (``scheduler._accepted``: a guess stands while the served model's own
sample agrees with it), so the output is distributed exactly as without guesses.

The draft model keeps a paged KV cache of its own, as many tokens as the served model's, and per
request the tokens whose K/V it holds. Before guessing, it computes the tokens it has not seen
(the whole context the first time, then the last accepted tokens and the served model's own) in
one forward pass for all the step's guessing requests, which gives each its first guess; each
further guess is one decode pass for all of them. The K/V of guesses the served model kept stay
valid: the next proposal starts where a request's tokens and the draft's part.

The draft runs eagerly, its layers in PyTorch and its attention on the served model's backend, on
the served model's device and dtype. A request's draft state goes when it finishes or is
preempted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inferd.attention.base import AttentionMetadata
from inferd.attention.registry import create_backend
from inferd.config import EngineConfig, ModelConfig, ModelLoadError, parse_dtype
from inferd.kv.manager import KVCacheManager
from inferd.models.loader import load_model
from inferd.sched.proposer import GuessRequest
from inferd.worker.kv_cache import allocate_kv_caches

logger = logging.getLogger(__name__)


def read_draft_config(path: Path, target: ModelConfig, max_model_len: int) -> ModelConfig:
    """The draft model's config, checked against the served model's (ModelLoadError): its token
    ids must mean the served model's tokens, and it must reach as far into the context."""
    draft = ModelConfig.from_folder(path)
    if draft.labels or draft.moe is not None:
        kind = "a classifier" if draft.labels else "a mixture of experts"
        raise ModelLoadError(f"draft model {path} is {kind}; a draft model is a dense causal LM")
    if draft.vocab_size > target.vocab_size:
        raise ModelLoadError(f"draft model {path} has a vocabulary of {draft.vocab_size} tokens, more than "
                             f"the served model's {target.vocab_size}: its guesses would not be the "
                             f"served model's tokens")  # fmt: skip
    if draft.max_position_embeddings < max_model_len:
        raise ModelLoadError(f"draft model {path} reaches {draft.max_position_embeddings} positions, fewer "
                             f"than the engine's max_model_len of {max_model_len}")  # fmt: skip
    return draft


@dataclass
class _DraftState:
    """What the draft's cache holds for one request: the K/V of the request's first ``valid``
    tokens, then of ``fed``, the guesses fed back after them (right where the request's next tokens
    turn out to be the same)."""

    valid: int = 0
    fed: list[int] = field(default_factory=list)
    # The request holds a token id past the draft's vocabulary (a served model's padded rows): it
    # never guesses.
    out_of_vocabulary: bool = False
    # It has a block table, which started from the blocks of its longest prefix the cache holds.
    attached: bool = False
    # Its cache salt: its blocks are shared only with requests of the same one.
    salt: str | None = None


class DraftModelProposer:
    batched = True  # one pass of the draft model for all of a step's guessing requests

    def __init__(self, config: EngineConfig, num_blocks: int) -> None:
        assert config.speculative is not None and config.speculative.model is not None
        self.num_tokens = config.speculative.num_speculative_tokens
        path = Path(config.speculative.model)
        self.config = read_draft_config(path, config.model, config.scheduler.max_model_len)
        self.device = torch.device(config.device)
        dtype = parse_dtype(config.dtype)
        self.model = load_model(path, self.config, config.scheduler.max_model_len, dtype, config.device)
        self.block_size = config.cache.block_size
        # As many blocks as the served model's cache (the KV budget holds both: builder's
        # resolve_num_blocks), and prefix caching as it has: requests that share a prompt's start
        # share its blocks in both.
        self.kv = KVCacheManager(num_blocks, self.block_size, config.cache.enable_prefix_caching)
        self.kv_caches = allocate_kv_caches(self.config, num_blocks, self.block_size, dtype, self.device)
        # The served model's attention backend (the Triton kernels on a GPU); the layers' own ops
        # are PyTorch's: the served model's kernel options need not suit the draft's architecture.
        self.backend = create_backend(config.attention_backend, config.device)
        # Most tokens the draft computes for a step's catching up (the served model's step budget).
        self.max_pass_tokens = config.scheduler.max_num_batched_tokens
        self._states: dict[str, _DraftState] = {}
        logger.info("draft model %s (%d layers) proposes up to %d tokens a step", path,
                    self.config.num_layers, self.num_tokens)  # fmt: skip

    def forget(self, request_id: str) -> None:
        """Drop a request's draft state (it finished or was preempted)."""
        self._states.pop(request_id, None)
        self.kv.free(request_id)

    def cache_usage(self) -> float | None:
        return self.kv.usage()

    def reset_prefix_cache(self) -> None:
        self.kv.reset_prefix_cache()

    def propose_batch(self, requests: list[GuessRequest]) -> list[list[int]]:
        """Guesses for each request: up to its room of tokens the draft model decodes greedily
        after its tokens. No guess for a request the draft has not caught up with yet (a long
        prompt is computed over several steps, a step's budget of tokens at most each), or whose
        tokens it cannot read, or when its cache is full."""
        guesses: list[list[int]] = [[] for _ in requests]
        pending: list[tuple[int, int]] = []  # (index, first token to compute)
        for index, asked in enumerate(requests):
            request_id, tokens, room = asked.request_id, asked.tokens, asked.room
            state = self._states.setdefault(request_id, _DraftState())
            state.salt = asked.cache_salt
            if room <= 0 or state.out_of_vocabulary:
                continue
            # The tokens it has not read must be its own (all of them, the first time).
            start = self._first_unknown(state, tokens) if state.attached else 0
            if max(tokens[start:]) >= self.config.vocab_size:
                state.out_of_vocabulary = True
                continue
            if not state.attached:  # its first proposal: what the cache holds of its start is its own
                state.valid = self.kv.find_cached_prefix(request_id, tokens, state.salt)
                state.attached = True
                start = self._first_unknown(state, tokens)
            # Its last token's K/V is written with it, and each guess but the last is fed back.
            if not self.kv.allocate(request_id, len(tokens) + room - 1):
                self.forget(request_id)  # its cache space goes to the others
                continue
            pending.append((index, start))
        if not pending:
            return guesses
        with torch.inference_mode():
            caught_up = self._catch_up(requests, pending, guesses)
            live, step = caught_up, 1
            while live := [i for i in live if requests[i].room > step]:
                fed = [
                    (requests[i].request_id, len(requests[i].tokens) + step - 1, guesses[i][-1]) for i in live
                ]
                for index, token in zip(live, self._decode(fed), strict=True):
                    guesses[index].append(token)
                step += 1
        for index in caught_up:
            asked = requests[index]
            # The K/V of the context and of every guess fed back (all but the last).
            self._computed(asked.request_id, asked.tokens, len(asked.tokens), guesses[index][:-1])
        return guesses

    def _computed(self, request_id: str, tokens: list[int], valid: int, fed: list[int]) -> None:
        """Record that the draft's cache holds the K/V of the request's first ``valid`` tokens and
        of ``fed`` after them, and offer its blocks full of real tokens to the prefix cache."""
        salt = self._states[request_id].salt
        self._states[request_id] = _DraftState(valid, fed, attached=True, salt=salt)
        self.kv.cache_computed_blocks(request_id, lambda start, end: tokens[start:end], valid, salt)

    def _first_unknown(self, state: _DraftState, tokens: list[int]) -> int:
        """The first of ``tokens`` whose K/V the draft's cache does not hold (never past the last,
        whose logits give the first guess): after the tokens it computed and the guesses it fed
        back that the request's tokens agree with. A request's tokens only grow (a preempted one
        starts afresh), so this costs the guesses' length, not the context's."""
        start = min(state.valid, len(tokens) - 1)
        for guess in state.fed:
            if start >= len(tokens) - 1 or tokens[start] != guess:
                break
            start += 1
        return start

    def _catch_up(
        self,
        requests: list[GuessRequest],
        pending: list[tuple[int, int]],
        guesses: list[list[int]],
    ) -> list[int]:
        """One pass over the tokens the draft has not computed, ``max_pass_tokens`` at most, the
        requests with the fewest first (decoding ones, before a new prompt): each request computed
        to its last token gets its first guess (their indices are returned); one cut short keeps
        what it computed for the next step."""
        chunk: list[tuple[int, int, list[int]]] = []  # (index, first position, tokens)
        budget = self.max_pass_tokens
        for index, start in sorted(pending, key=lambda item: len(requests[item[0]].tokens) - item[1]):
            tokens = requests[index].tokens
            take = min(len(tokens) - start, budget)
            if take <= 0:
                break
            chunk.append((index, start, tokens[start : start + take]))
            budget -= take
        predicted = self._forward([(requests[index].request_id, start, part) for index, start, part in chunk])
        caught_up = []
        for (index, start, part), token in zip(chunk, predicted, strict=True):
            request_id, tokens = requests[index].request_id, requests[index].tokens
            if start + len(part) == len(tokens):
                guesses[index].append(token)
                caught_up.append(index)
            else:
                self._computed(request_id, tokens, start + len(part), [])
        return caught_up

    def _decode(self, fed: list[tuple[str, int, int]]) -> list[int]:
        """One decode pass: each ``(request id, position, token)`` fed; the next token of each."""
        return self._forward([(request_id, position, [token]) for request_id, position, token in fed])

    def _forward(self, sequences: list[tuple[str, int, list[int]]]) -> list[int]:
        """Run ``(request id, first position, tokens)`` for each sequence through the draft model,
        writing their K/V; the greedy next token after each sequence's last."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        for request_id, start, tokens in sequences:
            table = self.kv.block_table(request_id)
            span = range(start, start + len(tokens))
            ids += tokens
            positions += span
            slots += [table[p // self.block_size] * self.block_size + p % self.block_size for p in span]
            query_lens.append(len(tokens))
            seq_lens.append(start + len(tokens))
            tables.append(table)
        width = max(len(table) for table in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        device = self.device
        meta = AttentionMetadata.from_host(slots, query_lens, seq_lens, padded, device)
        hidden = self.model(
            torch.tensor(ids, dtype=torch.int64, device=device),
            torch.tensor(positions, dtype=torch.int64, device=device),
            self.kv_caches,
            meta,
            self.backend,
        )
        last_rows = meta.query_start_loc[1:].to(torch.int64) - 1
        logits = self.model.compute_logits(hidden[last_rows])
        return [int(token) for token in logits.argmax(dim=-1).tolist()]
