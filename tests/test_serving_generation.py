"""The v2 generate parameters as Triton's vLLM backend clients send them: numbers and flags as
text, lists as JSON text, and the vLLM fields that reach SamplingParams."""

from __future__ import annotations

import pytest

from inferd.serving.errors import InvalidInputError
from inferd.serving.generation import generation_params
from inferd.serving.runtimes.base import GenerationResult


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


class _OldStream:
    """A runtime's stream written before streams counted their tokens: deltas and a result only."""

    def __init__(self) -> None:
        self._sent: list[str] = []

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        for word in ("a", " b"):
            self._sent.append(word)
            yield word

    def result(self) -> GenerationResult:
        return GenerationResult("".join(self._sent), "stop", 1, 2)


class _OldGenerator:
    def generate(self, text: str, params: object) -> _OldStream:
        return _OldStream()


async def test_a_runtime_without_counts_serves_all_but_the_counted_outputs() -> None:
    from inferd.serving.dataplane import DataPlane
    from inferd.serving.llm_io import llm_request

    chunks = [chunk async for chunk in DataPlane.generate_stream(_OldGenerator(), llm_request("x", {}))]  # type: ignore[arg-type]
    assert [chunk.text for chunk in chunks] == ["a", " b", ""] and chunks[-1].result is not None
    counted = llm_request("x", {"return_num_output_tokens": True})
    with pytest.raises(InvalidInputError, match="num_output_tokens"):
        [chunk async for chunk in DataPlane.generate_stream(_OldGenerator(), counted)]  # type: ignore[arg-type]


def test_an_output_asked_for_twice_is_invalid_input() -> None:
    import numpy as np

    from inferd.serving.llm_io import read_llm_request
    from inferd.serving.tensor import InferRequest, RequestedOutput, Tensor

    text = Tensor("text_input", "BYTES", np.array([b"hi"], dtype=object))
    twice = [RequestedOutput("finish_reason"), RequestedOutput("finish_reason")]
    with pytest.raises(InvalidInputError, match="twice"):
        read_llm_request(InferRequest([text], twice))
    assert read_llm_request(InferRequest([text], twice[:1])).extras == ("finish_reason",)


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"max_token": 3}, "'max_token'"),  # a typo used to give the default 16 tokens
        ({"spaces_between_special_tokens": False}, "'spaces_between_special_tokens'"),
        ({"truncate_prompt_tokens": 5}, "'truncate_prompt_tokens'"),
        ({"sampling_parameters": "{}"}, "'sampling_parameters'"),
    ],
)
def test_unknown_fields_are_refused_naming_them(parameters: dict[str, object], named: str) -> None:
    with pytest.raises(InvalidInputError, match=f"unknown parameter\\(s\\) {named}.*max_tokens"):
        generation_params(parameters)


def test_tritons_own_request_parameters_and_the_callers_flags_are_no_sampling_fields() -> None:
    triton = {
        "timeout": 0,
        "priority": 0,
        "sequence_id": 7,
        "sequence_start": True,
        "sequence_end": False,
        "binary_data_output": True,
        "triton_enable_empty_final_response": True,
        "content_type": "str",  # the Open Inference Protocol's request-level one (MLServer's codecs)
    }
    assert generation_params(triton).sampling == {}
    with pytest.raises(InvalidInputError, match="'return_finish_reason'"):
        generation_params({"return_finish_reason": True})
    assert (
        generation_params({"return_finish_reason": True}, also_known={"return_finish_reason"}).sampling == {}
    )


def test_vllm_fields_the_engine_takes_pass_through() -> None:
    params = generation_params(
        {
            "bad_words": '["I", "me"]',
            "allowed_token_ids": [5, 6],
            "logit_bias": {"7": -100},
            "stop_token_ids": [1],
        }
    )
    assert params.sampling == {
        "bad_words": ["I", "me"],
        "allowed_token_ids": [5, 6],
        "logit_bias": {7: -100.0},
        "stop_token_ids": [1],
    }


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"logprobs": 2}, "'logprobs' is not supported"),
        ({"prompt_logprobs": 1}, "'prompt_logprobs' is not supported"),
        ({"bad_words": 5}, "'bad_words' must be a string or a list"),
        ({"stop": "a", "stop_words": "b"}, "'stop' and 'stop_words' say the same"),
        ({"logit_bias": "[1]"}, "'logit_bias' must be an object"),
        ({"logit_bias": {"a": 1}}, "keys must be token ids"),
        ({"logit_bias": {"1": "up"}}, "must be a number"),
        ({"allowed_token_ids": [1.5]}, "'allowed_token_ids' must be a list of token ids"),
    ],
)
def test_vllm_fields_a_v2_response_cannot_carry_or_badly_typed_are_refused(
    parameters: dict[str, object], named: str
) -> None:
    with pytest.raises(InvalidInputError, match=named):
        generation_params(parameters)


def test_word_lists_take_one_word_or_none_as_text() -> None:
    """Triton's generate examples send `"bad_words": ""` and `"stop_words": ""` (the TensorRT-LLM
    backend's names): no words; a plain word is one, as a plain stop string is."""
    assert generation_params({"bad_words": "", "stop_words": ""}).sampling == {}
    assert generation_params({"bad_words": ""}).stop == ()
    assert generation_params({"bad_words": "I"}).sampling == {"bad_words": ["I"]}
    assert generation_params({"stop_words": '["###", "END"]'}).stop == ("###", "END")
    assert generation_params({"stop_words": "END"}).stop == ("END",)


@pytest.mark.parametrize("key", ["guided_decoding", "structured_outputs"])
def test_the_vllm_backends_structured_output_objects_constrain(key: str) -> None:
    """Triton's vLLM backend takes `guided_decoding` (mapped onto vLLM's `structured_outputs`);
    either used to be dropped, leaving the output free."""
    from inferd.structured.spec import StructuredOutput

    for value in ({"choice": ["yes", "no"]}, '{"choice": ["yes", "no"]}'):
        params = generation_params({key: value})
        assert params.structured_output == StructuredOutput(choice=["yes", "no"])
        assert params.structured_output_field == key
    schema = generation_params({key: {"json": {"type": "object"}, "disable_fallback": True}})
    assert schema.structured_output == StructuredOutput(json='{"type": "object"}')
    assert generation_params({key: {"json_object": True}}).structured_output == StructuredOutput(
        json_object=True
    )
    for bad, named in (
        ({"backend": "outlines", "regex": "a+"}, "'backend'"),
        ({"regex": "a", "choice": ["b"]}, "exactly one"),
        ({"choice": []}, "non-empty list"),
        (["choice"], "must be an object"),
        ("{", "not valid JSON"),
        ('{"json": ' + "1" * 5000 + "}", "not valid JSON"),  # past the 4,300-digit limit: a 500 before
        # The compiler read NaN as null: the output held to a schema never sent.
        ({"json": {"const": float("nan")}}, r"json\.const holds NaN"),
        ('{"json": {"maximum": Infinity}}', r"json\.maximum holds NaN, Infinity"),
    ):
        with pytest.raises(InvalidInputError, match=named):
            generation_params({key: bad})
    with pytest.raises(InvalidInputError, match="one structured output at most"):
        generation_params({key: {"regex": "a"}, "guided_regex": "b"})


def test_tritons_priority_is_the_engines_and_zero_its_default() -> None:
    """Triton's schedule-policy priority: 0 (or none) is the default, a lower value runs sooner,
    as the engine's priority of the same number (it refuses one under first-come-first-served)."""
    assert generation_params({"priority": 3}).sampling == {"priority": 3}
    assert generation_params({"priority": "2"}).sampling == {"priority": 2}  # a vLLM client's text
    assert "priority" not in generation_params({"priority": 0}).sampling
    with pytest.raises(InvalidInputError, match="'priority' must be a non-negative integer"):
        generation_params({"priority": -1})
    with pytest.raises(InvalidInputError, match="'priority' must be an integer"):
        generation_params({"priority": 1.5})
