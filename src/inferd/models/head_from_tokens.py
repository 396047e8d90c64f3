"""A classifier's head made from its causal LM's head (``config.HeadFromTokens``, vLLM's
``classifier_from_token``): the LM head's rows of some tokens, or for a two-way head the second
token's row minus the first's, so that the one label's logit is ``logit(true) - logit(false)``.

An LLM trained to answer a relevance question with "yes" or "no" (Qwen3-Reranker) then serves as a
cross-encoder: the head reads two rows instead of the vocabulary, and the label's sigmoid is the
probability of "yes" against "no".
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from inferd.config import HeadFromTokens, ModelLoadError


def token_ids(path: Path, head: HeadFromTokens) -> list[int]:
    """The ids of ``head``'s tokens in the folder's tokenizer, each spelled as its vocabulary
    spells it (transformers' ``convert_tokens_to_ids``)."""
    file = path / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # the tokenizers library raises a bare Exception
        raise ModelLoadError(f"{file}: cannot read the tokens of classifier_from_token: {exc}") from None
    ids = []
    for token in head.tokens:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ModelLoadError(f"classifier_from_token {token!r} is not a token of {file}")
        ids.append(token_id)
    return ids


def head_weight(lm_head: torch.Tensor, head: HeadFromTokens, ids: list[int]) -> torch.Tensor:
    """The classifier's head, [labels, hidden] in float32, from the LM head ``lm_head``
    ([vocabulary, hidden]: its own, or its embeddings where they are tied)."""
    if max(ids) >= lm_head.shape[0]:
        size = lm_head.shape[0]
        raise ModelLoadError(f"classifier_from_token's ids {ids} do not fit the LM head's {size} rows")
    rows = lm_head[ids].to(torch.float32)
    return rows[1:2] - rows[0:1] if head.two_way else rows
