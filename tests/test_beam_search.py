"""Beam search: the ranking rules on made-up steps, and the engine's search against one written here
over transformers' logits on the same weights."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
import transformers
from server_process import run_server

from inferd import LLM, SamplingParams
from inferd.engine.beam_search import Beam, BeamSearch, BeamSearchParams
from inferd.engine.input_processor import PromptError
from inferd.sample.sampler import TokenLogprobs


def _step(*alternatives: tuple[int, float]) -> TokenLogprobs:
    return TokenLogprobs(alternatives[0][0], alternatives[0][1], tuple(alternatives))


def test_the_likeliest_beams_live_on_and_eos_sets_a_beam_aside() -> None:
    search = BeamSearch(BeamSearchParams(beam_width=2, max_tokens=3), frozenset({0}))
    search.advance([_step((5, -0.1), (0, -0.5), (6, -1.0), (7, -3.0))])
    assert [beam.token_ids for beam in search.live] == [(5,), (6,)]
    assert [(beam.token_ids, beam.finish_reason) for beam in search.finished] == [((0,), "stop")]
    search.advance(
        [_step((8, -2.0), (9, -2.1), (1, -5.0), (2, -6.0)), _step((3, -0.2), (4, -0.3), (1, -4.0), (2, -5.0))]
    )
    # Summed log-probabilities: 6,3 (-1.2) and 6,4 (-1.3) beat 5,8 (-2.1).
    assert [beam.token_ids for beam in search.live] == [(6, 3), (6, 4)]
    search.advance([_step((1, -0.1), (2, -9.0), (3, -9.0), (4, -9.0))] * 2)
    assert search.done
    # Finished by length: scored over their length; the EOS beam's EOS does not count.
    best = search.best()
    assert [beam.token_ids for beam in best] == [(6, 3, 1), (6, 4, 1)]
    lenient = BeamSearch(BeamSearchParams(beam_width=2, max_tokens=3, length_penalty=0.0), frozenset({0}))
    lenient.finished = list(search.finished)
    assert lenient.best()[0].token_ids == (0,)  # no length normalisation: the short beam wins


def test_an_ending_eos_does_not_count_in_a_beams_length() -> None:
    search = BeamSearch(BeamSearchParams(beam_width=2, max_tokens=2), frozenset({0}))
    search.finished = [Beam((5, 0), -0.7, "stop"), Beam((6, 7), -1.0, "length")]
    # -0.7 over one token against -1.0 over two.
    assert [beam.token_ids for beam in search.best()] == [(6, 7), (5, 0)]


def test_ignore_eos_keeps_eos_beams_alive() -> None:
    search = BeamSearch(BeamSearchParams(beam_width=1, max_tokens=2, ignore_eos=True), frozenset({0}))
    search.advance([_step((0, -0.1), (5, -2.0))])
    assert [beam.token_ids for beam in search.live] == [(0,)] and not search.finished


def test_bad_params_are_refused() -> None:
    for kwargs in ({"beam_width": 0, "max_tokens": 4}, {"beam_width": 11, "max_tokens": 4},
                   {"beam_width": 2, "max_tokens": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            BeamSearchParams(**kwargs)


def _reference(
    model, prompt: list[int], params: BeamSearchParams, eos: set[int]
) -> list[tuple[list[int], float]]:  # type: ignore[no-untyped-def]
    """Beam search written out over transformers' full forward passes."""
    live: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[list[int], float, bool]] = []
    for _ in range(params.max_tokens):
        candidates = []
        for tokens, total in live:
            with torch.inference_mode():
                logits = model(torch.tensor([prompt + tokens])).logits[0, -1].float()
            values, ids = logits.log_softmax(-1).topk(2 * params.beam_width)
            for value, token in zip(values.tolist(), ids.tolist(), strict=True):
                if token in eos and not params.ignore_eos:
                    finished.append(([*tokens, token], total + value, True))
                else:
                    candidates.append(([*tokens, token], total + value))
        live = sorted(candidates, key=lambda c: c[1], reverse=True)[: params.beam_width]
        if not live:
            break
    finished += [(tokens, total, False) for tokens, total in live]

    def score(entry: tuple[list[int], float, bool]) -> float:
        return entry[1] / max(len(entry[0]) - entry[2], 1) ** params.length_penalty

    return [
        (tokens, total) for tokens, total, _ in sorted(finished, key=score, reverse=True)[: params.beam_width]
    ]


@pytest.mark.parametrize("width,length_penalty", [(3, 1.0), (4, 0.5)])
def test_the_engines_search_is_the_written_out_one(
    tiny_model_factory, width: int, length_penalty: float
) -> None:
    folder = tiny_model_factory("qwen3")
    llm = LLM(folder, kv_cache_memory="16MiB", block_size=4)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [list(range(5, 25)), [7, 300, 12]]
    params = BeamSearchParams(beam_width=width, max_tokens=6, length_penalty=length_penalty)
    results = llm.beam_search(prompts, params)
    for prompt, result in zip(prompts, results, strict=True):
        expected = _reference(model, prompt, params, eos={0})
        assert [seq.token_ids for seq in result.sequences] == [tokens for tokens, _ in expected]
        for seq, (_, total) in zip(result.sequences, expected, strict=True):
            assert seq.cumulative_logprob == pytest.approx(total, abs=1e-4)
            assert seq.text == llm.tokenizer.decode(seq.token_ids)
    # The beams' steps were served from the prefix cache.
    assert llm.engine.stats().prefix_hits > 0


def test_a_width_of_one_is_greedy_and_a_prompt_too_long_fails_first(tiny_model_factory) -> None:
    llm = LLM(tiny_model_factory("llama"), kv_cache_memory="8MiB")
    prompt = list(range(5, 30))
    greedy = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    (result,) = llm.beam_search([prompt], BeamSearchParams(beam_width=1, max_tokens=8, ignore_eos=True))
    assert result.sequences[0].token_ids == greedy.token_ids
    with pytest.raises(PromptError):
        llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=600))
    assert not llm.engine.has_unfinished()


def test_served_beam_search_answers_as_the_offline_one(tiny_model_factory) -> None:
    folder = tiny_model_factory("qwen3")
    llm = LLM(folder, kv_cache_memory="8MiB")
    prompts = [list(range(5, 25)), [7, 300, 12]]
    offline = llm.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=5, length_penalty=0.5))
    with run_server(folder, "--kv-cache-memory", "8MiB") as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(
            model=server.model, prompt=prompts, n=3, max_tokens=5, temperature=0.7,
            extra_body={"use_beam_search": True, "length_penalty": 0.5},
        )  # fmt: skip
        expected = [seq.text for result in offline for seq in result.sequences]
        assert [choice.text for choice in reply.choices] == expected
        assert [choice.index for choice in reply.choices] == list(range(6))
        reasons = [seq.finish_reason for result in offline for seq in result.sequences]
        assert [choice.finish_reason for choice in reply.choices] == reasons
        lengths = sum(len(seq.token_ids) for result in offline for seq in result.sequences)
        assert reply.usage is not None and reply.usage.completion_tokens == lengths
        for extra, field in (({"stream": True}, "stream"), ({"logprobs": 1}, "logprobs"), ({"n": 11}, "n"),
                             ({"stop": ["x"]}, "stop")):  # fmt: skip
            body = {"model": server.model, "prompt": "hi", "max_tokens": 3, "use_beam_search": True, **extra}
            response = httpx.post(f"{server.base_url}/v1/completions", json=body)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == field
