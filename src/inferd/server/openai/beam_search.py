"""vLLM's `use_beam_search` on `/v1/completions` and `/v1/chat/completions`: the engine's beam search
(`engine/beam_search.py`) driven from the event loop, each step one batch of one-token requests
through the Frontend (so timeouts, admission and metrics apply to them as to any request)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from inferd.engine.beam_search import (
    MAX_BEAM_WIDTH,
    Beam,
    BeamSearch,
    BeamSearchParams,
    advance_all,
    live_sequences,
    step_params,
)
from inferd.engine.outputs import RequestOutput
from inferd.sampling_params import SamplingParams
from inferd.server.errors import ApiError, InvalidRequestError, RequestTimeoutError
from inferd.server.frontend import Frontend
from inferd.server.openai.common import error_event_payload, finish_reason, usage
from inferd.server.openai.protocol import (
    ChatCompletionRequest,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
)
from inferd.server.streaming import SSE_DONE, sse_event
from inferd.server.structured_request import GUIDED_FIELDS, requested

if TYPE_CHECKING:
    from inferd.server.openai.completions import CompletionJob


def check_beam_request(body: CompletionRequest | ChatCompletionRequest) -> None:
    """What a beam search cannot honour (stops, log-probabilities, constraints on the tokens) is
    refused, naming the field. Sampling settings (temperature, top_p, penalties,
    seed...) do not apply to it and are ignored, as in vLLM."""
    if body.n > MAX_BEAM_WIDTH:
        raise InvalidRequestError(f"n: a beam search keeps at most {MAX_BEAM_WIDTH} beams, got {body.n}", "n")
    # A structured output that constrains something (response_format "text" does not).
    fields = ("response_format", "structured_outputs", *GUIDED_FIELDS)
    structure, structure_field = requested({name: getattr(body, name) for name in fields})
    refused = {
        "stop": bool(body.stop),
        "stop_token_ids": bool(body.stop_token_ids),
        "min_tokens": body.min_tokens > 0,
        "logit_bias": bool(body.logit_bias),
        "bad_words": bool(body.bad_words),
        "allowed_token_ids": body.allowed_token_ids is not None,
        "prompt_logprobs": body.prompt_logprobs is not None,
        structure_field or "response_format": structure is not None,
    }
    if isinstance(body, CompletionRequest):
        refused |= {"best_of": body.best_of is not None and body.best_of != body.n,
                    "logprobs": body.logprobs is not None, "echo": body.echo}  # fmt: skip
    else:
        # A named or required tool choice is a constraint on the tokens too.
        refused |= {"logprobs": body.logprobs, "tool_choice": body.tool_choice not in (None, "auto", "none")}
    for name, is_set in refused.items():
        if is_set:
            raise InvalidRequestError(f"{name} is not supported with use_beam_search", name)


@dataclass(frozen=True)
class BeamAnswer:
    """One returned beam: its tokens, its text (an ending EOS leaves none) and finish reason."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: Literal["stop", "length"]


async def run_beam_search(
    frontend: Frontend,
    request_id: str,
    prompts: list[list[int]],
    params: SamplingParams,
    width: int,
    length_penalty: float,
    timeout_s: float | None,
) -> list[list[BeamAnswer]]:
    """Each prompt's ``width`` best beams, best first. ``params``: the request's (its budget,
    adapter, priority, cache salt, ignore_eos and skip_special_tokens apply)."""
    searches = []
    for prompt in prompts:
        _, budget = frontend.llm.prepare(prompt, params)
        search_params = BeamSearchParams(width, budget, params.ignore_eos, length_penalty)
        searches.append(BeamSearch(search_params, frontend.eos_token_ids, len(prompt)))
    per_step = step_params(searches[0].params, params.adapter, params.priority, params.cache_salt)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    step = 0
    # The whole search is in flight, between its steps too: a drain waits for it, its later steps
    # are never refused by the drain or the queue limits its first passed, and its adapter stays.
    frontend.num_in_flight += 1
    try:
        with frontend.holding_adapter(params.adapter):  # not unloaded between its steps
            while not all(search.done for search in searches):
                stepped = live_sequences(searches, prompts)
                sequences = [tokens for _, tokens in stepped]
                outputs = await _step(
                    frontend, f"{request_id}-s{step}", sequences, per_step, deadline, step > 0
                )
                if step == 0:  # admitted: what each prompt asked for, once (its steps are one-token requests)
                    for _ in prompts:
                        frontend.metrics.record_asked(params.max_tokens, width)
                advance_all(stepped, [out.logprobs[0] for out in outputs])
                step += 1
    finally:
        frontend.num_in_flight -= 1
    return [[_answer(frontend, beam, params) for beam in search.best()] for search in searches]


def _answer(frontend: Frontend, beam: Beam, params: SamplingParams) -> BeamAnswer:
    # As the engine's outputs: the EOS that ends an answer adds no text, special token or not.
    shown = beam.token_ids[:-1] if beam.finish_reason == "stop" else beam.token_ids
    text = frontend.tokenizer.decode(shown, skip_special_tokens=params.skip_special_tokens)
    return BeamAnswer(beam.token_ids, text, "stop" if beam.finish_reason == "stop" else "length")


async def beam_complete(frontend: Frontend, job: CompletionJob) -> CompletionResponse:
    """The ``job.n`` best beams of each prompt, best first (choice ``p * n + k``)."""
    assert job.length_penalty is not None
    found = await run_beam_search(
        frontend, job.request_id, job.prompts, job.params, job.n, job.length_penalty, job.timeout_s
    )
    answers = [answer for beams in found for answer in beams]
    choices = [
        CompletionChoice(
            index=index,
            text=answer.text,
            logprobs=None,
            finish_reason=answer.finish_reason,
            prompt_token_ids=job.prompt_token_ids(index),
            token_ids=list(answer.token_ids) if job.return_token_ids else None,
        )
        for index, answer in enumerate(answers)
    ]
    return CompletionResponse(
        id=job.response_id,
        created=job.created,
        model=job.model,
        choices=choices,
        usage=usage(job.num_prompt_tokens, sum(len(answer.token_ids) for answer in answers)),
    )


async def stream_beam_completion(frontend: Frontend, job: CompletionJob) -> AsyncIterator[str]:
    """A beam search streamed, as vLLM streams one: no beam is an answer until the search ends, so
    the beams come whole once it has, a chunk each (best first), then a usage chunk if asked, then
    [DONE]; an error is an error event."""
    try:
        whole = await beam_complete(frontend, job)
        for choice in whole.choices:
            so_far = whole.usage if job.continuous_usage else None  # the search has ended: all of it
            yield sse_event(whole.model_copy(update={"choices": [choice], "usage": so_far}).model_dump_json())
        if job.include_usage:
            yield sse_event(whole.model_copy(update={"choices": []}).model_dump_json())
    except ApiError as exc:
        yield sse_event(error_event_payload(exc))
    yield SSE_DONE


async def _step(
    frontend: Frontend,
    request_id: str,
    sequences: list[list[int]],
    params: SamplingParams,
    deadline: float | None,
    continuing: bool,
) -> list[RequestOutput]:
    """One step of every live beam: each sequence's next-token alternatives, in order."""
    timeout_s = None
    if deadline is not None:
        timeout_s = deadline - time.monotonic()
        if timeout_s <= 0:
            raise RequestTimeoutError("the request timed out and was aborted")
    finals: dict[int, RequestOutput] = {}
    steps = frontend.generate(request_id, sequences, params, 1, timeout_s, continuing, records_asked=False)
    async with aclosing(steps) as stream:
        async for item in stream:
            if item.output.finished:
                finish_reason(item.output)  # a timed-out or failed step raises
                finals[item.index] = item.output
    return [finals[index] for index in range(len(sequences))]
