"""Structured outputs at run time: one grammar matcher per constrained request, advanced by each
token it produces, and the masks that keep the sampler to the tokens its grammar allows next."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from inferd.structured.deep_stack import on_deep_stack
from inferd.structured.spec import StructuredOutput, StructuredOutputError

if TYPE_CHECKING:
    from llguidance import LLMatcher, LLTokenizer

logger = logging.getLogger(__name__)


def matcher_error(matcher: LLMatcher) -> str:
    """Why ``matcher`` stopped, without the dump of its state and grammar that llguidance appends
    (dozens of lines, and the whole grammar: up to the constraint's size cap, in a client's 400)."""
    return str(matcher.get_error()).split("<state>", 1)[0].strip()


def bitmask_words(vocab_size: int) -> int:
    """32-bit words of one row's mask: bit t of the row is token t (1: allowed)."""
    return -(-vocab_size // 32)


class RequestGrammar:
    """A request's place in its grammar. One that starts after some tokens (``starts_after``)
    is idle until the output ends with them: no mask, no token consumed."""

    def __init__(self, matcher: LLMatcher, vocab_size: int, starts_after: list[int] | None = None) -> None:
        self._matcher = matcher
        self.words = bitmask_words(vocab_size)  # of the mask `fill_bitmask` writes
        self._trigger = starts_after or []
        self.active = not self._trigger

    def watch(self, output_token_ids: list[int]) -> None:
        """Before the constraint starts: start it once the output ends with its trigger."""
        trigger = self._trigger
        if output_token_ids[-len(trigger) :] == trigger:
            self.active = True

    def fill_bitmask(self, row: torch.Tensor, forbidden: frozenset[int] = frozenset()) -> None:
        """Write the tokens allowed next into ``row`` (int32, contiguous, on the CPU), less the
        ``forbidden`` ones (EOS for a request that ignores it)."""
        assert row.dtype == torch.int32 and row.is_contiguous() and row.device.type == "cpu"
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        for token in forbidden:
            word, bit = divmod(token, 32)
            if word < row.numel():
                value = (int(row[word]) & 0xFFFFFFFF) & ~(1 << bit)
                row[word] = value - (1 << 32) if value >= 1 << 31 else value  # back to a signed int32

    def accept(self, token_id: int) -> str | None:
        """Advance past ``token_id``; returns why it was refused (None when accepted)."""
        if not self._matcher.consume_token(token_id):
            problem = matcher_error(self._matcher)
            return f"the output no longer matches its structured-output constraint: {problem}"
        if self._matcher.is_error():
            # Where no text the grammar allows can follow, its mask lets only EOS through, and the
            # matcher takes it but stops in error: ending there would pass the output off as one
            # that matches.
            return (
                "the output cannot go on to match its structured-output constraint: no text the "
                "constraint allows follows what came so far (one that no text matches ends at the "
                "first token)"
            )
        return None

    @property
    def complete(self) -> bool:
        """Whether the grammar allows nothing more: the output is whole."""
        return bool(self._matcher.is_stopped())


class GrammarCompiler:
    """Builds requests' matchers over the model's tokenizer (read once, when first needed)."""

    def __init__(self, tokenizer_file: Path, vocab_size: int) -> None:
        self._tokenizer_file = tokenizer_file
        self._vocab_size = vocab_size
        # One per set of end-of-sequence ids (in practice one per engine): EOS may end an output
        # wherever its grammar accepts one.
        self._tokenizers: dict[frozenset[int], LLTokenizer] = {}
        # Why the tokenizer cannot be read for masks, once known: not read again for each request.
        self._unreadable: str | None = None

    def check_tokenizer(self, eos_token_ids: frozenset[int]) -> None:
        """Read the tokenizer for masks now, if not yet; a StructuredOutputError says why it cannot be."""
        self._tokenizer(eos_token_ids)

    def matcher_for(self, spec: StructuredOutput, eos_token_ids: frozenset[int]) -> RequestGrammar:
        from llguidance import LLMatcher

        tokenizer = self._tokenizer(eos_token_ids)
        grammar = spec.grammar_text()
        matcher = on_deep_stack(lambda: LLMatcher(tokenizer, grammar, log_level=0))
        if matcher.is_error():
            problem = matcher_error(matcher)
            raise StructuredOutputError(
                f"the constraint does not compile over this model's tokenizer: {problem}"
            )
        return RequestGrammar(matcher, tokenizer.vocab_size, spec.starts_after)

    def _tokenizer(self, eos_token_ids: frozenset[int]) -> LLTokenizer:
        tokenizer = self._tokenizers.get(eos_token_ids)
        if tokenizer is None:
            from llguidance import LLTokenizer
            from tokenizers import Tokenizer

            if self._unreadable is not None:
                raise StructuredOutputError(self._unreadable)
            start = time.perf_counter()
            source = Tokenizer.from_file(str(self._tokenizer_file))
            # The mask covers the model's vocabulary, which may be padded past the tokenizer's.
            n_vocab = max(self._vocab_size, source.get_vocab_size(with_added_tokens=True))
            eos = sorted(eos_token_ids) or None
            try:
                tokenizer = LLTokenizer(source.to_str(), n_vocab=n_vocab, eos_token=eos)
            except Exception as exc:  # llguidance reads byte-level and byte-fallback vocabularies only
                self._unreadable = f"structured outputs are not available for this model's tokenizer: {exc}"
                raise StructuredOutputError(self._unreadable) from None
            self._tokenizers[eos_token_ids] = tokenizer
            logger.info("structured outputs: read the tokenizer's %d tokens in %.2f s",
                        n_vocab, time.perf_counter() - start)  # fmt: skip
        return tokenizer


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set to -inf, in the rows ``rows`` of ``logits``, every token its row of ``bitmask`` does
    not allow (``bitmask``: int32 [len(rows), words], on the logits' device)."""
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    # An arithmetic shift copies the sign bit, but "& 1" keeps only the bit shifted down.
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab].bool()
    picked = logits.index_select(0, rows).masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, rows, picked)
