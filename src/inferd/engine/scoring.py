"""Which texts a score request pairs, and how a pair is scored: vLLM's ``LLM.score`` and
``/v1/score`` semantics, shared by the offline API and the server.

- One first text is scored against every second one; two lists of one length pair by pair.
- An embedding model (any causal LM here) scores a pair by the cosine similarity of the two
  texts' normalized last-token embeddings. A sequence classifier of one label (a cross-encoder,
  such as a reranker converted to ``*ForSequenceClassification``) reads both texts as one input,
  joined by the tokenizer's pair template (an LLM reranker, whose head is made from tokens, as one
  text: ``joined_pair``), and scores it by the sigmoid of its logit. A classifier of more labels
  gives no single score (``classify`` gives its labels).
"""

from __future__ import annotations

from inferd.config import ModelConfig
from inferd.engine.tokenizer import Tokenizer


class PairingError(ValueError):
    """Texts that cannot be paired; ``field`` is "text_1" or "text_2", the list at fault."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def pair_indices(firsts: int, seconds: int) -> list[tuple[int, int]]:
    """The (first, second) index of each scored pair, for ``firsts`` and ``seconds`` texts."""
    if not firsts or not seconds:
        raise PairingError("text_1 and text_2 must not be empty lists", "text_1" if not firsts else "text_2")
    if firsts == 1:
        return [(0, j) for j in range(seconds)]
    if firsts != seconds:
        raise PairingError(
            f"text_1 has {firsts} texts and text_2 {seconds}: lists are scored pair by pair, so their "
            f"lengths must match (or text_1 holds one text)",
            "text_2",
        )
    return [(i, i) for i in range(firsts)]


def joined_pair(
    tokenizer: Tokenizer, model: ModelConfig, first: str, second: str, cut_to_fit: bool = False
) -> list[int]:
    """The tokens a cross-encoder reads for a pair: the two texts joined by the tokenizer's pair
    template; for an LLM reranker (a head from tokens, ``config.HeadFromTokens``) the two texts as
    one text, as vLLM joins them, unless its ``use_pad_token`` asks for the template.
    ``cut_to_fit``: the pair is kept by its last tokens (``truncate_prompt_tokens``), so texts too
    long for the context are cut to their end, not refused."""
    head = model.head_from_tokens
    if head is not None and not head.use_pad_token:
        return tokenizer.encode(first + second, cut_to_fit=cut_to_fit)
    return tokenizer.encode_pair(first, second, cut_to_fit)


def check_scoring_labels(labels: tuple[str, ...]) -> None:
    """Refuse a classifier that gives no single score: one of two or more labels."""
    if len(labels) > 1:
        raise ValueError(f"the model is a classifier of {len(labels)} labels: a score comes from an "
                         f"embedding model or a classifier of one label (a cross-encoder); classify "
                         f"gives its labels")  # fmt: skip
