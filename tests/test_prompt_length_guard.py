"""A text too long for the context is refused by its length, before it is tokenized: tokenizing
takes time and memory as the text's length, on a server's event loop."""

from __future__ import annotations

import pytest

from inferd import LLM, SamplingParams
from inferd.engine.input_processor import PromptError
from inferd.engine.tokenizer import InvalidTextError


@pytest.fixture(scope="module")
def llm(tiny_model_factory) -> LLM:
    return LLM(tiny_model_factory("llama"), kv_cache_memory="4MiB", max_model_len=64)


def test_a_text_longer_than_any_context_could_hold_is_refused_untokenized(llm: LLM, monkeypatch) -> None:
    tokenizer = llm.engine.tokenizer
    assert tokenizer.max_text_chars is not None
    calls: list[int] = []
    encode = tokenizer._tok.encode
    monkeypatch.setattr(
        tokenizer._tok, "encode", lambda text, **kw: calls.append(len(text)) or encode(text, **kw)
    )
    with pytest.raises(PromptError, match="more tokens than this model's context of 64 holds"):
        llm.generate("word " * tokenizer.max_text_chars, SamplingParams(max_tokens=1))
    for call in (lambda text: tokenizer.encode_spans(text), lambda text: tokenizer.encode_pair(text, "x")):
        with pytest.raises(InvalidTextError, match="more tokens than"):
            call("y" * (tokenizer.max_text_chars + 1))
    assert calls == []


def test_the_bound_never_refuses_a_text_that_fits(llm: LLM) -> None:
    """A context's worth of the token that stands for the most text is tokenized, not refused."""
    tokenizer = llm.engine.tokenizer
    widest = max(
        range(tokenizer.vocab_size), key=lambda t: len(tokenizer.decode([t], skip_special_tokens=False))
    )
    text = tokenizer.decode([widest], skip_special_tokens=False) * 64
    assert len(tokenizer.encode(text, add_special_tokens=False)) >= 64


def test_a_truncated_text_is_cut_to_the_end_that_may_fit(llm: LLM) -> None:
    tokenizer = llm.engine.tokenizer
    long = "abc " * tokenizer.max_text_chars + "the end"
    tail = tokenizer.encode_last(long, 5)
    assert tail == tokenizer.encode_last("abc " * 50 + "the end", 5)
    assert tokenizer.encode(long, add_special_tokens=False, cut_to_fit=True)[-3:] == tail[-3:]
