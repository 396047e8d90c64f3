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
    return TokenLogprobs(alternatives[0][0], alternatives[0][1], tuple(alternatives), 1)


def test_the_likeliest_beams_live_on_and_eos_sets_a_beam_aside() -> None:
    search = BeamSearch(BeamSearchParams(beam_width=2, max_tokens=3), frozenset({0}), 0)
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
    lenient = BeamSearch(BeamSearchParams(beam_width=2, max_tokens=3, length_penalty=0.0), frozenset({0}), 0)
    lenient.finished = list(search.finished)
    assert lenient.best()[0].token_ids == (0,)  # no length normalisation: the short beam wins


def test_a_beams_length_counts_its_prompt_but_not_an_ending_eos() -> None:
    """vLLM's rule: the summed log-probability over the whole sequence's length."""
    finished = [Beam((5, 0), -0.7, "stop"), Beam((6, 7), -1.0, "length")]
    alone = BeamSearch(BeamSearchParams(beam_width=2, max_tokens=2), frozenset({0}), 0)
    alone.finished = list(finished)
    # -0.7 over one token against -1.0 over two.
    assert [beam.token_ids for beam in alone.best()] == [(6, 7), (5, 0)]
    prompted = BeamSearch(BeamSearchParams(beam_width=2, max_tokens=2), frozenset({0}), 10)
    prompted.finished = list(finished)
    # -0.7 over 11 tokens against -1.0 over 12.
    assert [beam.token_ids for beam in prompted.best()] == [(5, 0), (6, 7)]


def test_ignore_eos_keeps_eos_beams_alive() -> None:
    search = BeamSearch(BeamSearchParams(beam_width=1, max_tokens=2, ignore_eos=True), frozenset({0}), 0)
    search.advance([_step((0, -0.1), (5, -2.0))])
    assert [beam.token_ids for beam in search.live] == [(0,)] and not search.finished


def test_bad_params_are_refused() -> None:
    for kwargs in ({"beam_width": 0, "max_tokens": 4}, {"beam_width": 11, "max_tokens": 4},
                   {"beam_width": 2, "max_tokens": 0},
                   {"beam_width": 2, "max_tokens": 4, "length_penalty": 11}):  # fmt: skip
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

    def score(entry: tuple[list[int], float, bool]) -> float:  # vLLM's: over prompt and output, EOS not
        return entry[1] / max(len(prompt) + len(entry[0]) - entry[2], 1) ** params.length_penalty

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
        assert "stop" in reasons  # beams that ended on EOS, whose EOS adds no text even unskipped:
        kept = client.completions.create(
            model=server.model, prompt=prompts, n=3, max_tokens=5,
            extra_body={"use_beam_search": True, "length_penalty": 0.5, "skip_special_tokens": False},
        )  # fmt: skip
        assert [choice.text for choice in kept.choices] == expected
        with_ids = client.completions.create(
            model=server.model, prompt=prompts, n=3, max_tokens=5,
            extra_body={"use_beam_search": True, "length_penalty": 0.5, "return_token_ids": True},
        )  # fmt: skip
        ids = [(c.model_extra or {}).get("token_ids") for c in with_ids.choices]
        assert ids == [list(seq.token_ids) for result in offline for seq in result.sequences]
        assert [(c.model_extra or {}).get("prompt_token_ids") for c in with_ids.choices] == [
            prompt for prompt in prompts for _ in range(3)
        ]
        # Streamed, as vLLM streams a search: each beam whole in a chunk of its own once the search
        # has ended, then the usage.
        chunks = list(client.completions.create(
            model=server.model, prompt=prompts, n=3, max_tokens=5, stream=True,
            stream_options={"include_usage": True},
            extra_body={"use_beam_search": True, "length_penalty": 0.5},
        ))  # fmt: skip
        beams = [chunk.choices[0] for chunk in chunks if chunk.choices]
        found = [(c.index, c.text, c.finish_reason) for c in beams]
        assert found == list(zip(range(6), expected, reasons, strict=True))
        assert chunks[-1].usage == reply.usage and not chunks[-1].choices
        refusals = (({"logprobs": 1}, "logprobs"), ({"n": 11}, "n"),
                    ({"stop": ["x"]}, "stop"), ({"stop_token_ids": [3]}, "stop_token_ids"),
                    ({"bad_words": ["a"]}, "bad_words"),
                    ({"length_penalty": 11}, "length_penalty"))  # fmt: skip
        for extra, field in refusals:
            body = {"model": server.model, "prompt": "hi", "max_tokens": 3, "use_beam_search": True, **extra}
            response = httpx.post(f"{server.base_url}/v1/completions", json=body)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == field
        # Chat: the same search over the templated prompt, each beam read as an answer.
        messages = [{"role": "user", "content": "To be, or not"}]
        chat_ids = llm.tokenizer.encode(
            llm.tokenizer.apply_chat_template(messages, True), add_special_tokens=False
        )
        (chat_offline,) = llm.beam_search([chat_ids], BeamSearchParams(beam_width=2, max_tokens=6))
        chat = client.chat.completions.create(
            model=server.model, messages=messages, n=2, max_tokens=6, extra_body={"use_beam_search": True}
        )  # type: ignore[call-overload]
        assert [choice.message.content for choice in chat.choices] == [
            seq.text for seq in chat_offline.sequences
        ]
        assert chat.usage is not None and chat.usage.prompt_tokens == len(chat_ids)
        chat_with_ids = client.chat.completions.create(
            model=server.model, messages=messages, n=2, max_tokens=6,
            extra_body={"use_beam_search": True, "return_token_ids": True},
        )  # type: ignore[call-overload]  # fmt: skip
        assert (chat_with_ids.model_extra or {}).get("prompt_token_ids") == chat_ids
        assert [(c.model_extra or {}).get("token_ids") for c in chat_with_ids.choices] == [
            list(seq.token_ids) for seq in chat_offline.sequences
        ]
        streamed = list(client.chat.completions.create(
            model=server.model, messages=messages, n=2, max_tokens=6, stream=True,
            stream_options={"include_usage": True}, extra_body={"use_beam_search": True},
        ))  # type: ignore[call-overload]  # fmt: skip
        assert [c.delta.role for c in streamed[0].choices] == ["assistant", "assistant"]
        answers = [chunk.choices[0] for chunk in streamed[1:] if chunk.choices]
        assert [(c.index, c.delta.content, c.finish_reason) for c in answers] == [
            (c.index, c.message.content, c.finish_reason) for c in chat.choices
        ]
        assert streamed[-1].usage == chat.usage
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        chat_refusals = (({"logprobs": True}, "logprobs"),
                         ({"tools": tools, "tool_choice": "required"}, "tool_choice"),
                         ({"response_format": {"type": "json_object"}}, "response_format"))  # fmt: skip
        for extra, field in chat_refusals:
            body = {"model": server.model, "messages": messages, "use_beam_search": True, **extra}
            response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body)
            assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
            assert "not supported with use_beam_search" in response.json()["error"]["message"]
        # A response_format that constrains nothing is no reason to refuse.
        text = {"model": server.model, "messages": messages, "use_beam_search": True, "n": 2, "max_tokens": 6,
                "response_format": {"type": "text"}}  # fmt: skip
        response = httpx.post(f"{server.base_url}/v1/chat/completions", json=text)
        assert response.status_code == 200, response.text
        assert [c["message"]["content"] for c in response.json()["choices"]] == [
            s.text for s in chat_offline.sequences
        ]


async def test_a_served_search_is_in_flight_throughout_and_a_drain_lets_it_end(tiny_model_factory) -> None:
    """Between its steps too: a drain waits for it and does not refuse its later steps, which keep
    the request's priority."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from inferd.engine.async_llm import AsyncLLM
    from inferd.server.frontend import Frontend
    from inferd.server.metrics import ServerMetrics
    from inferd.server.openai.beam_search import beam_complete
    from inferd.server.openai.completions import prepare_completion
    from inferd.server.openai.protocol import CompletionRequest

    llm = AsyncLLM.from_options(
        tiny_model_factory("qwen3"), kv_cache_memory="8MiB", scheduling_policy="priority"
    )
    llm.start()
    try:
        frontend = Frontend(llm, "tiny", ServerMetrics(CollectorRegistry(), "tiny", llm.stats))
        steps = []
        generate = frontend.generate

        def recording(request_id, sequences, params, *args, **kwargs):  # type: ignore[no-untyped-def]
            steps.append((params.priority, frontend.num_in_flight))
            return generate(request_id, sequences, params, *args, **kwargs)

        frontend.generate = recording  # type: ignore[method-assign]
        body = CompletionRequest(prompt=[5, 6, 7], max_tokens=12, n=2, use_beam_search=True, priority=-3)
        search = asyncio.ensure_future(beam_complete(frontend, prepare_completion(frontend, body)))
        while len(steps) < 2 and not search.done():  # a search that failed ends the wait too
            await asyncio.sleep(0.01)
        frontend.draining = True
        response = await search
    finally:
        llm.shutdown()
    assert len(response.choices) == 2 and len(steps) >= 12
    assert all(priority == -3 and in_flight >= 1 for priority, in_flight in steps)
    assert frontend.num_in_flight == 0


def test_a_failed_offline_step_says_so(tiny_model_factory, monkeypatch) -> None:
    llm = LLM(tiny_model_factory("llama"), kv_cache_memory="8MiB")
    generate = llm.generate

    def failing(prompts, params, **options):  # type: ignore[no-untyped-def]
        outputs = generate(prompts, params, **options)
        outputs[0].error, outputs[0].logprobs = "the device fell over", []
        return outputs

    monkeypatch.setattr(llm, "generate", failing)
    with pytest.raises(RuntimeError, match="the device fell over"):
        llm.beam_search([[5, 6, 7]], BeamSearchParams(beam_width=2, max_tokens=3))


async def test_a_served_searchs_adapter_is_not_unloaded_between_its_steps(
    tiny_model_factory, tmp_path
) -> None:
    import asyncio

    from prometheus_client import CollectorRegistry
    from tiny_models import make_lora_adapter

    from inferd.engine.async_llm import AsyncLLM
    from inferd.server.errors import InvalidRequestError
    from inferd.server.frontend import Frontend
    from inferd.server.metrics import ServerMetrics
    from inferd.server.openai.beam_search import beam_complete
    from inferd.server.openai.completions import prepare_completion
    from inferd.server.openai.protocol import CompletionRequest

    base = tiny_model_factory("qwen3")
    adapter = make_lora_adapter(base, tmp_path / "style", seed=3)
    llm = AsyncLLM.from_options(base, kv_cache_memory="8MiB", allow_runtime_lora_updating=True)
    llm.start()
    try:
        frontend = Frontend(llm, "tiny", ServerMetrics(CollectorRegistry(), "tiny", llm.stats))
        await frontend.load_adapter("style", str(adapter))
        # The search waits before its second step, with no engine request of its own running.
        gate, calls, generate = asyncio.Event(), [], frontend.generate

        async def gated(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(args)
            if len(calls) == 2:
                await gate.wait()
            async for item in generate(*args, **kwargs):
                yield item

        frontend.generate = gated  # type: ignore[method-assign]
        body = CompletionRequest(model="style", prompt=[5, 6, 7], max_tokens=12, n=2, use_beam_search=True)
        search = asyncio.ensure_future(beam_complete(frontend, prepare_completion(frontend, body)))
        while len(calls) < 2 and not search.done():  # a search that failed ends the wait too
            await asyncio.sleep(0.01)
        with pytest.raises(InvalidRequestError, match="in use by 1 beam search"):
            await frontend.unload_adapter("style")
        gate.set()
        assert len((await search).choices) == 2
        await frontend.unload_adapter("style")
        assert frontend.adapters == ()
    finally:
        llm.shutdown()


def test_an_offline_search_with_an_adapter_searches_its_answers(tiny_model_factory, tmp_path) -> None:
    from tiny_models import make_lora_adapter

    base = tiny_model_factory("qwen3")
    llm = LLM(
        base,
        kv_cache_memory="8MiB",
        lora_modules={"style": str(make_lora_adapter(base, tmp_path / "s", seed=4))},
    )
    prompt = list(range(5, 25))
    greedy = llm.generate(
        [prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, adapter="style")
    )
    plain = llm.beam_search([prompt], BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True))
    (styled,) = llm.beam_search(
        [prompt], BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True), adapter="style"
    )
    assert styled.sequences[0].token_ids == greedy[0].token_ids != plain[0].sequences[0].token_ids
