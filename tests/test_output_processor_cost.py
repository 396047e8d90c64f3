"""What a streamed step costs the OutputProcessor: an output's cumulative fields (text, token_ids,
logprobs) are its own step's even when read later, and making one does not copy the history."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from inferd.engine.output_processor import OutputProcessor
from inferd.engine.outputs import EngineCoreOutput, Prefix, RequestMetrics, RequestOutput, TextPrefix
from inferd.engine.tokenizer import Tokenizer
from inferd.sample.sampler import TokenLogprobs
from inferd.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(tiny_llama) -> Tokenizer:
    return Tokenizer(tiny_llama)


def _tokens(tokenizer: Tokenizer, count: int) -> list[int]:
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * (count // 5 + 1))
    assert len(ids) >= count
    return ids[:count]


def _step(processor: OutputProcessor, token_id: int, reason: str | None = None) -> RequestOutput:
    logprobs = TokenLogprobs(token_id, -0.5, (), 1)
    (out,) = processor.process([EngineCoreOutput("r", token_id, logprobs, reason)]).outputs
    return out


def _read(out: RequestOutput) -> tuple[str, list[int], int, int | None, list[int], str]:
    last = out.token_ids[-1] if out.token_ids else None
    logprob_ids = [entry.token_id for entry in out.logprobs]
    return out.text, list(out.token_ids), len(out.token_ids), last, logprob_ids, out.new_text


@pytest.mark.parametrize("stop", [[], ["never in this text"]])
def test_an_output_shows_its_own_step_when_read_later(tokenizer: Tokenizer, stop: list[str]) -> None:
    """Readers on another thread or event loop may read an output after more tokens came."""
    processor = OutputProcessor(tokenizer)
    processor.add("r", tokenizer.encode("Hello"), SamplingParams(max_tokens=100, stop=stop, logprobs=0), 0.0)
    token_ids = _tokens(tokenizer, 60)
    outputs, at_once = [], []
    for step, token_id in enumerate(token_ids):
        out = _step(processor, token_id, "length" if step == len(token_ids) - 1 else None)
        outputs.append(out)
        at_once.append(_read(out))
    later = [_read(out) for out in outputs]
    assert later == at_once
    for step, (text, ids, count, last, logprob_ids, _) in enumerate(later):
        assert ids == token_ids[: step + 1] and count == step + 1 and last == token_ids[step]
        assert logprob_ids == ids
        assert text == "".join(new_text for *_, new_text in later[: step + 1])
    assert later[-1][0] == tokenizer.decode(token_ids)


def test_a_stop_string_cut_leaves_earlier_outputs_as_they_were(tokenizer: Tokenizer) -> None:
    token_ids = _tokens(tokenizer, 40)
    text = tokenizer.decode(token_ids)
    stop = text[len(text) // 2 : len(text) // 2 + 6]
    processor = OutputProcessor(tokenizer)
    processor.add("r", tokenizer.encode("Hello"), SamplingParams(max_tokens=100, stop=[stop]), 0.0)
    outputs, at_once = [], []
    for token_id in token_ids:
        out = _step(processor, token_id)
        outputs.append(out)
        at_once.append(_read(out))
        if out.finished:
            break
    assert outputs[-1].finish_reason == "stop" and outputs[-1].text == text[: text.index(stop)]
    assert [_read(out) for out in outputs] == at_once


def _bytes_allocated_by_a_step(processor: OutputProcessor, token_id: int) -> int:
    """What a step allocates and keeps or frees (the peak of Python's allocations over it)."""
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    out = _step(processor, token_id)
    _, peak = tracemalloc.get_traced_memory()
    assert len(out.token_ids) > 0 and out.new_token_ids == [token_id]
    return peak - before


@pytest.mark.parametrize("stop", [[], ["never in this text"]])
def test_a_step_does_not_copy_the_history(tokenizer: Tokenizer, stop: list[str]) -> None:
    """A streamed step allocates the same at 2,000 tokens as at 20: no copy of the token ids,
    logprobs or text so far (bytes counted by tracemalloc, not time). Copying them cost a step
    ~16 KiB of list and ~10 KiB of text per request at 2,000 tokens, and the GC walks the lists."""
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(max_tokens=5000, stop=stop, logprobs=0)
    processor.add("r", tokenizer.encode("Hello"), params, 0.0)
    token_ids = _tokens(tokenizer, 2040)
    kept = []  # outputs stay alive, as a slow reader's queue holds them
    tracemalloc.start()
    try:
        early, late = [], []
        for step, token_id in enumerate(token_ids):
            if 20 <= step < 40:
                early.append(_bytes_allocated_by_a_step(processor, token_id))
            elif step >= 2020:
                late.append(_bytes_allocated_by_a_step(processor, token_id))
            else:
                kept.append(_step(processor, token_id))
    finally:
        tracemalloc.stop()
    # Medians: a list's or dict's occasional resize is no copy of the history per step.
    early.sort()
    late.sort()
    assert late[len(late) // 2] - early[len(early) // 2] < 1024, (early, late)


def test_the_last_output_holds_plain_lists_and_text(tokenizer: Tokenizer) -> None:
    processor = OutputProcessor(tokenizer)
    processor.add("r", tokenizer.encode("Hello"), SamplingParams(max_tokens=10, logprobs=0), 0.0)
    token_ids = _tokens(tokenizer, 10)
    outputs = [_step(processor, t, "length" if i == 9 else None) for i, t in enumerate(token_ids)]
    last = outputs[-1]
    assert type(last.token_ids) is list and type(last.logprobs) is list and type(last.text) is str
    assert json.loads(json.dumps({"ids": last.token_ids})) == {"ids": token_ids}
    assert isinstance(outputs[0].token_ids, Prefix)  # a view while the request grows
    assert type(outputs[0].logprobs) is list and len(outputs[0].logprobs) == 1
    assert last.outputs[0].token_ids == token_ids and type(last.outputs[0].token_ids) is list


def test_prefix_is_a_read_only_list_of_its_first_items() -> None:
    items = [1, 2, 3, 4]
    view = Prefix(items, 3)
    items.append(5)
    assert len(view) == 3 and view[-1] == 3 and view[0] == 1
    with pytest.raises(IndexError):
        view[3]
    assert view[1:] == [2, 3] and view[::-1] == [3, 2, 1] and view[-2:] == [2, 3]
    assert list(view) == [1, 2, 3] and view == [1, 2, 3] and [1, 2, 3] == view and view != [1, 2]
    assert view == Prefix([1, 2, 3], 3) and 3 in view and 4 not in view and repr(view) == "[1, 2, 3]"
    assert json.dumps(list(view)) == "[1, 2, 3]"


def test_request_output_is_built_as_before() -> None:
    out = RequestOutput("r", [9], "ab", [1, 2], "b", [2], False, None, RequestMetrics(0.0))
    assert out.text == "ab" and out.token_ids == [1, 2] and out.logprobs == [] and type(out.logprobs) is list
    out.text = "abc"
    assert out.text == "abc" and "text='abc'" in repr(out)
    assert out == RequestOutput("r", [9], "abc", [1, 2], "b", [2], False, None, out.metrics)
    assert str(TextPrefix(["ab", "cd", "e"], 2, 3)) == "abc"
