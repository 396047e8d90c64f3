"""How the OpenAI endpoints name a token in their log-probabilities, and vLLM's `prompt_logprobs`."""

from __future__ import annotations

from collections.abc import Sequence

from inferd.engine.tokenizer import Tokenizer
from inferd.sample.sampler import TokenLogprobs
from inferd.server.openai.protocol import PromptLogprob


def token_name(tokenizer: Tokenizer, token_id: int, as_id: bool) -> str:
    """The token as a logprobs answer shows it: its text, or ``token_id:N`` with vLLM's
    ``return_tokens_as_token_ids`` (tokens whose bytes are no whole character, which all decode
    to the same replacement character, stay told apart)."""
    if as_id:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def prompt_logprobs(
    tokenizer: Tokenizer, scored: Sequence[TokenLogprobs | None] | None, top: int | None, as_ids: bool
) -> list[dict[str, PromptLogprob] | None] | None:
    """None where the request asked for none (``top`` None) or the output has none. Else vLLM's
    shape: per prompt token, None for the first (nothing comes before it), else a map
    from token id (as text) to its log-probability, rank and text: the prompt's own token first,
    then the `top` likeliest (ranked 1 to `top`); where the prompt's token is among those, it keeps
    its first place in the map and takes its place among them as its rank (as vLLM's, so tied
    log-probabilities still rank 1 to `top`)."""
    if top is None or scored is None:
        return None
    result: list[dict[str, PromptLogprob] | None] = []
    for entry in scored:
        if entry is None:
            result.append(None)
            continue
        ranked = {entry.token_id: (entry.logprob, entry.rank)}
        for place, (token_id, logprob) in enumerate(entry.top[:top], start=1):
            ranked[token_id] = (logprob, place)
        result.append(
            {
                str(token_id): PromptLogprob(
                    logprob=logprob, rank=rank, decoded_token=token_name(tokenizer, token_id, as_ids)
                )
                for token_id, (logprob, rank) in ranked.items()
            }
        )
    return result
