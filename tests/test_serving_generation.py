"""The v2 generate parameters as Triton's vLLM backend clients send them: numbers and flags as
text, lists as JSON text, and the vLLM fields that reach SamplingParams."""

from __future__ import annotations

import pytest

from inferd.serving.errors import InvalidInputError
from inferd.serving.generation import generation_params


def test_numbers_flags_and_lists_may_come_as_text() -> None:
    params = generation_params(
        {
            "max_tokens": "100",
            "temperature": "0.1",
            "top_k": "5",
            "min_p": "0.05",
            "ignore_eos": "true",
            "skip_special_tokens": "0",
            "stop_token_ids": "[7, 8]",
            "stop": '["###", "END"]',
            "lora_name": "sql",
        }
    )
    assert (params.max_tokens, params.temperature, params.top_k) == (100, 0.1, 5)
    assert params.stop == ("###", "END")
    assert params.sampling == {
        "min_p": 0.05,
        "ignore_eos": True,
        "skip_special_tokens": False,
        "stop_token_ids": [7, 8],
        "adapter": "sql",
    }
    assert "logprobs" not in params.sampling


def test_a_stop_string_that_only_looks_like_a_list_is_one_stop_string() -> None:
    assert generation_params({"stop": "[INST]"}).stop == ("[INST]",)
    assert generation_params({"stop": "[]"}).stop == ("[]",)


def test_a_cumulative_logprob_asks_for_the_sampled_tokens_logprobs() -> None:
    assert generation_params({}, cumulative_logprob=True).sampling == {"logprobs": 0}


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"max_tokens": "1.5"}, "max_tokens"),
        ({"ignore_eos": "maybe"}, "ignore_eos"),
        ({"n": "2"}, "'n'"),
        ({"best_of": 3}, "best_of"),
        ({"use_beam_search": "true"}, "use_beam_search"),
        ({"stop_token_ids": "[1, true]"}, "stop_token_ids"),
        ({"stop_token_ids": "{"}, "stop_token_ids"),
        ({"lora_name": ""}, "lora_name"),
    ],
)
def test_bad_values_name_their_parameter(parameters: dict[str, object], named: str) -> None:
    with pytest.raises(InvalidInputError, match=named):
        generation_params(parameters)


def test_one_sequence_is_what_a_request_already_asks() -> None:
    assert generation_params({"n": "1", "best_of": 1}).sampling == {}
