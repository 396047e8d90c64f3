"""A streamed completion with `echo`, `logprobs` and n > 1: only a prompt's first sample scores it,
so another choice's chunks that come before those scores wait for them, then lead with them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from inferd.engine.outputs import RequestMetrics, RequestOutput
from inferd.sample.sampler import TokenLogprobs
from inferd.sampling_params import SamplingParams
from inferd.server.frontend import IndexedOutput
from inferd.server.openai.completions import CompletionJob, stream_completion

PROMPT = [7, 8, 9]
PROMPT_SCORES: list[TokenLogprobs | None] = [
    None,
    TokenLogprobs(8, -1.5, ((8, -1.5),), 1),
    TokenLogprobs(9, -2.5, ((9, -2.5),), 1),
]


class _Tokens:
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{t}>" for t in token_ids)


def _output(new_token: int, finished: bool, scored: bool) -> RequestOutput:
    entry = TokenLogprobs(new_token, -0.25, ((new_token, -0.25),), 1)
    return RequestOutput(
        request_id="r",
        prompt_token_ids=PROMPT,
        text=f"<{new_token}>",
        token_ids=[new_token],
        new_text=f"<{new_token}>",
        new_token_ids=[new_token],
        finished=finished,
        finish_reason="length" if finished else None,
        metrics=RequestMetrics(arrival_time=0.0),
        new_logprobs=[entry],
        prompt_logprobs=PROMPT_SCORES if scored else None,
    )


class _Frontend:
    """Yields the given outputs in the given order, and records how it was asked."""

    tokenizer = _Tokens()

    def __init__(self, items: list[IndexedOutput]) -> None:
        self.items = items
        self.asked: dict[str, Any] = {}

    def generate(self, *_: Any, **kwargs: Any) -> AsyncIterator[IndexedOutput]:
        self.asked = kwargs

        async def outputs() -> AsyncIterator[IndexedOutput]:
            for item in self.items:
                yield item

        return outputs()


async def _logprobs_by_choice(frontend: _Frontend) -> dict[int, list[list[float | None]]]:
    job = CompletionJob(
        "cmpl-x",
        "m",
        [PROMPT],
        ["<7><8><9>"],
        SamplingParams(),
        2,
        echo=True,
        include_usage=False,
        logprobs=1,
    )
    chunks: dict[int, list[list[float | None]]] = {}
    async for event in stream_completion(frontend, job):  # type: ignore[arg-type]
        if event.startswith("data: {"):
            for choice in json.loads(event[len("data: ") :])["choices"]:
                chunks.setdefault(choice["index"], []).append(choice["logprobs"]["token_logprobs"])
    return chunks


async def test_a_choice_before_its_prompts_scores_waits_for_them() -> None:
    frontend = _Frontend(
        [
            IndexedOutput(1, _output(20, finished=False, scored=False)),  # choice 1 comes first
            IndexedOutput(1, _output(21, finished=False, scored=False)),
            IndexedOutput(0, _output(10, finished=False, scored=True)),
            IndexedOutput(1, _output(22, finished=True, scored=False)),
            IndexedOutput(0, _output(11, finished=True, scored=False)),
        ]
    )
    chunks = await _logprobs_by_choice(frontend)
    assert frontend.asked["scores_once"] is True
    echoed = [None, -1.5, -2.5]
    assert chunks[0] == [[*echoed, -0.25], [-0.25]]
    assert chunks[1] == [[*echoed, -0.25], [-0.25], [-0.25]]


async def test_choices_held_for_a_first_sample_that_never_scored_go_out_at_the_end() -> None:
    frontend = _Frontend(
        [
            IndexedOutput(1, _output(20, finished=True, scored=False)),
            IndexedOutput(0, _output(10, finished=True, scored=False)),  # ended without its scores
        ]
    )
    assert await _logprobs_by_choice(frontend) == {0: [[-0.25]], 1: [[-0.25]]}
