"""Incremental detokenization and stop strings, per request."""

from __future__ import annotations

from inferd.engine.tokenizer import Tokenizer

# Byte-level BPE yields U+FFFD while a multi-byte character is still incomplete.
_INCOMPLETE = "\ufffd"
# Prompt tokens kept as left context, so the first output token decodes as it would mid-text
# (e.g. SentencePiece-style decoders drop a leading space at the start of a text).
_CONTEXT_TOKENS = 5
# Tokens already emitted are dropped from the window past this many, keeping decoding O(1).
_MAX_WINDOW = 64


class IncrementalDetokenizer:
    """Turns a growing list of token ids into a growing text, never splitting a character.

    Decodes a small window (``prefix``..end) and emits what the window adds over its
    ``prefix``..``read`` part; when the tail is an incomplete character it waits for more tokens.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._tokens = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        # A prompt of token ids may end inside a character, which the output's first bytes could
        # complete: its text would then shrink under the window's prefix. Left out of the context,
        # the output's text is its own bytes, on every path.
        while self._tokens and tokenizer.decode(self._tokens, skip_special_tokens).endswith(_INCOMPLETE):
            self._tokens.pop()
        self._prefix = 0
        self._read = len(self._tokens)

    def add(self, token_id: int) -> str:
        """Append one token; returns the text it completes (may be empty)."""
        self._tokens.append(token_id)
        decode = self._tokenizer.decode
        prefix_text = decode(self._tokens[self._prefix : self._read], self._skip_special)
        full_text = decode(self._tokens[self._prefix :], self._skip_special)
        if len(full_text) <= len(prefix_text) or full_text.endswith(_INCOMPLETE):
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix = self._read
        self._read = len(self._tokens)
        if self._prefix > _MAX_WINDOW:
            del self._tokens[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return delta

    def decode_all(self, token_ids: list[int]) -> str:
        """The text of a whole output at once, for a request nobody streams: the same text as
        ``add`` for every token then ``flush``, from two decode calls instead of two per token."""
        context = self._tokens[: self._read]
        context_text = self._tokenizer.decode(context, self._skip_special)
        full_text = self._tokenizer.decode(context + token_ids, self._skip_special)
        if full_text.startswith(context_text):
            return full_text[len(context_text) :]
        return self._tokenizer.decode(token_ids, self._skip_special)

    def flush(self) -> str:
        """At the end of generation, emit whatever is left (an incomplete tail included)."""
        full_text = self._tokenizer.decode(self._tokens[self._prefix :], self._skip_special)
        prefix_text = self._tokenizer.decode(self._tokens[self._prefix : self._read], self._skip_special)
        delta = full_text[len(prefix_text) :] if full_text.startswith(prefix_text) else ""
        self._read = len(self._tokens)
        return delta


def find_stop(text: str, new_chars: int, stops: list[str]) -> tuple[int, str] | None:
    """Where the earliest stop string starts, and which one it is, looking only where the new
    text could complete one."""
    if not stops or not new_chars:
        return None
    old = len(text) - new_chars
    # Each stop string from where it would end in the new text: one wholly in older text was
    # either seen before or fell where stops were not checked (under `min_tokens`).
    found = [(text.find(s, max(old - len(s) + 1, 0)), s) for s in stops]
    return min(((i, s) for i, s in found if i >= 0), key=lambda match: match[0], default=None)
