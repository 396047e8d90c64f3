"""The OutputProcessor's stop handling: stop strings, stop token ids and what streamed text holds back."""

from __future__ import annotations

import pytest

from inferd.engine.output_processor import OutputProcessor
from inferd.engine.outputs import EngineCoreOutput, RequestOutput
from inferd.engine.tokenizer import Tokenizer
from inferd.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(tiny_llama) -> Tokenizer:
    return Tokenizer(tiny_llama)


def _run(
    tokenizer: Tokenizer,
    params: SamplingParams,
    token_ids: list[int],
    last_reason: str | None,
    final_only: bool = False,
) -> tuple[list[RequestOutput], list[str]]:
    """Feed `token_ids` one per step; the core ends the request with `last_reason` on the last one."""
    processor = OutputProcessor(tokenizer)
    processor.add("r", tokenizer.encode("Hello"), params, arrival_time=0.0, final_only=final_only)
    outputs: list[RequestOutput] = []
    stopped: list[str] = []
    for step, token_id in enumerate(token_ids):
        reason = last_reason if step == len(token_ids) - 1 else None
        processed = processor.process([EngineCoreOutput("r", token_id, None, reason)])
        outputs += processed.outputs
        stopped += processed.stopped
        if outputs and outputs[-1].finished:
            break
    return outputs, stopped


def test_a_stop_string_completed_by_the_last_allowed_token_is_a_stop(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" to be or not")
    # The core ends the request for length on the very token that completes " not".
    outputs, stopped = _run(tokenizer, SamplingParams(stop=[" not"]), ids, "length")
    assert outputs[-1].finish_reason == "stop"
    assert outputs[-1].text == " to be or"
    assert "".join(o.new_text for o in outputs) == " to be or"
    assert stopped == []  # the core has ended it already


@pytest.mark.parametrize("final_only", [False, True])
def test_the_stop_token_id_that_ends_an_output_adds_no_text(tokenizer: Tokenizer, final_only: bool) -> None:
    ids = tokenizer.encode(" to be or not")
    params = SamplingParams(stop_token_ids=[ids[-1]])
    outputs, _ = _run(tokenizer, params, ids, "stop", final_only=final_only)
    assert outputs[-1].finish_reason == "stop"
    assert outputs[-1].token_ids == ids  # the token itself is reported
    assert outputs[-1].text == tokenizer.decode(ids[:-1])
    kept = SamplingParams(stop_token_ids=[ids[-1]], include_stop_str_in_output=True)
    outputs, _ = _run(tokenizer, kept, ids, "stop", final_only=final_only)
    assert outputs[-1].text == " to be or not"


def test_stop_text_kept_in_the_output_is_streamed_without_holding_back(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" to be or not to be")
    texts = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    assert all("\ufffd" not in t for t in texts)
    kept = SamplingParams(stop=[" never ever"], include_stop_str_in_output=True)
    outputs, _ = _run(tokenizer, kept, ids, "length")
    assert [o.text for o in outputs] == texts
    # Cut at the stop, a possible start of it is held back until it cannot be one.
    cut = SamplingParams(stop=[" never ever"])
    outputs, _ = _run(tokenizer, cut, ids, "length")
    assert [o.text for o in outputs][:-1] != texts[:-1]
    assert outputs[-1].text == texts[-1]


@pytest.mark.parametrize("min_tokens", [0, 1, 3])
def test_stop_strings_count_after_min_tokens_and_sent_text_is_never_cut(
    tokenizer: Tokenizer, min_tokens: int
) -> None:
    ids = tokenizer.encode(" be" * 8, add_special_tokens=False)
    assert len(ids) == 8  # one " be" a token, each holding a "b"
    params = SamplingParams(stop=["b", "@@@@@@@@"], min_tokens=min_tokens)
    outputs, stopped = _run(tokenizer, params, ids, None)
    final = outputs[-1]
    # As stop token ids, the first token that may stop is the one after min_tokens.
    assert final.finish_reason == "stop" and stopped == ["r"]
    assert len(final.token_ids) == min_tokens + 1
    assert final.text == " be" * min_tokens + " "
    assert "".join(o.new_text for o in outputs) == final.text


def test_kept_stop_text_is_the_stop_that_matched(tokenizer: Tokenizer) -> None:
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in (" a", "b", " a")]
    assert all(len(piece) == 1 for piece in ids)
    # " a" may not stop the first token (min_tokens); "ab a" then ends at the third.
    params = SamplingParams(stop=["a", "ab a"], min_tokens=1, include_stop_str_in_output=True)
    outputs, _ = _run(tokenizer, params, [piece[0] for piece in ids], None)
    assert outputs[-1].text == " ab a" and outputs[-1].finish_reason == "stop"
    assert "".join(o.new_text for o in outputs) == outputs[-1].text
