"""`POST /v1/completions`: request -> Frontend job -> response or SSE chunks."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field

from inferd.engine.outputs import RequestOutput
from inferd.engine.tokenizer import Tokenizer
from inferd.sample.sampler import TokenLogprobs
from inferd.sampling_params import SamplingParams
from inferd.server.errors import ApiError, InvalidRequestError
from inferd.server.frontend import Frontend
from inferd.server.openai.beam_search import check_beam_request
from inferd.server.openai.common import (
    error_event_payload,
    finish_reason,
    sampling_params,
    stream_finish_reason,
    usage,
)
from inferd.server.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from inferd.server.openai.token_logprobs import prompt_logprobs, token_name
from inferd.server.streaming import SSE_DONE, sse_event


@dataclass
class _ChoiceState:
    """What has been sent for one choice so far (for echo, logprob text offsets and usage)."""

    echo_text: str
    text_offset: int = 0
    started: bool = False
    num_tokens: int = 0
    # With echo and logprobs: the echoed prompt's tokens and log-probabilities lead the first logprobs.
    prompt_logprobs_sent: bool = False
    # With return_token_ids: whether the prompt's tokens went out, and the generated tokens sent.
    prompt_ids_sent: bool = False
    token_ids_sent: int = 0


@dataclass
class CompletionJob:
    request_id: str  # the engine requests' (the server's own, unique)
    model: str
    prompts: list[list[int]]
    prompt_texts: list[str]
    params: SamplingParams
    n: int
    echo: bool
    include_usage: bool
    # Every chunk carries the usage so far (vLLM's continuous_usage_stats).
    continuous_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    timeout_s: float | None = None  # None: the server's default
    # Candidates sampled per prompt, of which the n likeliest are returned (the API's best_of).
    best_of: int = 1
    # The log-probabilities the client asked for (the engine computes them for best_of regardless).
    logprobs: int | None = None
    # Set: a beam search (server/openai/beam_search.py) ranking finished beams with this penalty.
    length_penalty: float | None = None
    # vLLM's return_token_ids: each choice carries its prompt's and its own token ids.
    return_token_ids: bool = False
    # vLLM's prompt_logprobs: each choice carries its prompt's, with this many alternatives.
    prompt_logprobs: int | None = None
    # vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:N".
    tokens_as_ids: bool = False
    # The answer's id: the client's own under the route's prefix where it gave one (the
    # X-Request-Id header, or the body's request_id: server/request_id.py); empty: request_id.
    response_id: str = ""

    def __post_init__(self) -> None:
        self.response_id = self.response_id or self.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def prompt_token_ids(self, index: int) -> list[int] | None:
        """Choice ``index``'s prompt tokens, where asked for."""
        return self.prompts[index // self.n] if self.return_token_ids else None

    def choice_state(self, index: int) -> _ChoiceState:
        return _ChoiceState(echo_text=self.prompt_texts[index // self.n] if self.echo else "")


def prepare_completion(
    frontend: Frontend, body: CompletionRequest, client_id: str | None = None
) -> CompletionJob:
    """Validate and tokenize; every error here is a 4xx before any generation starts."""
    frontend.check_model(body.model)
    if body.suffix:
        raise InvalidRequestError("suffix: insertion after a suffix is not supported", "suffix")
    if body.use_beam_search:
        check_beam_request(body)
    best_of = body.n if body.best_of is None else body.best_of
    if best_of < body.n:
        raise InvalidRequestError(f"best_of ({best_of}) must be at least n ({body.n})", "best_of")
    if best_of > body.n and body.stream:
        raise InvalidRequestError("best_of: results cannot be streamed when best_of exceeds n", "best_of")
    # Candidates are ranked by their tokens' log-probabilities, so the engine reports them.
    engine_logprobs = body.logprobs if best_of == body.n or body.logprobs is not None else 0
    params = sampling_params(frontend, body, body.max_tokens, engine_logprobs)
    if body.echo and body.logprobs is not None:
        # The echoed prompt's tokens get log-probabilities too (how a text is scored).
        params = dataclasses.replace(params, prompt_logprobs=max(body.logprobs, params.prompt_logprobs or 0))
    prompts = _prompt_list(body.prompt)
    add_special = body.add_special_tokens is not False  # vLLM's default for completions: true
    keep = body.truncate_prompt_tokens
    if keep is not None:
        prompts = [
            frontend.truncated(prompt, keep, params.max_tokens, add_special_tokens=add_special)
            for prompt in prompts
        ]
    token_ids = [frontend.prepare(prompt, params, add_special_tokens=add_special) for prompt in prompts]
    texts = [p if isinstance(p, str) else frontend.tokenizer.decode(p) for p in prompts] if body.echo else []
    request_id = frontend.new_request_id("cmpl")
    return CompletionJob(
        request_id=request_id,
        response_id=f"cmpl-{client_id}" if client_id else request_id,
        model=frontend.answering_name(body.model),
        prompts=token_ids,
        prompt_texts=texts,
        params=params,
        n=body.n,
        echo=body.echo,
        include_usage=body.include_usage_chunk,
        continuous_usage=body.continuous_usage,
        best_of=best_of,
        logprobs=body.logprobs,
        length_penalty=body.length_penalty if body.use_beam_search else None,
        return_token_ids=body.return_token_ids,
        prompt_logprobs=None if body.stream else body.prompt_logprobs,
        tokens_as_ids=body.return_tokens_as_token_ids,
    )


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequestError("prompt: must not be empty", "prompt")
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


async def complete(frontend: Frontend, job: CompletionJob) -> CompletionResponse:
    finals: dict[int, RequestOutput] = {}
    async with aclosing(
        # A prompt's first sample scores it for all its choices.
        frontend.generate(
            job.request_id, job.prompts, job.params, job.best_of, job.timeout_s, scores_once=True
        )
    ) as stream:
        async for item in stream:
            if item.output.finished:
                finals[item.index] = item.output
    choices = []
    for index, out in enumerate(_returned(job, finals)):
        state = job.choice_state(index)
        scored = finals[index // job.n * job.best_of]  # the prompt's first sample (``scores_once``)
        choices.append(
            CompletionChoice(
                index=index,
                text=state.echo_text + out.text,
                logprobs=_logprobs(frontend.tokenizer, job, out.logprobs, state, scored),
                finish_reason=finish_reason(out),
                stop_reason=out.stop_reason,
                prompt_token_ids=job.prompt_token_ids(index),
                token_ids=list(out.token_ids) if job.return_token_ids else None,
                prompt_logprobs=prompt_logprobs(
                    frontend.tokenizer,
                    scored.prompt_logprobs,
                    job.prompt_logprobs,
                    job.tokens_as_ids,
                ),
            )
        )
    # Every candidate's tokens were generated, so all of them count (as the API bills best_of).
    completion_tokens = sum(len(out.token_ids) for out in finals.values())
    cached = sum(finals[prompt * job.best_of].metrics.num_cached_tokens for prompt in range(len(job.prompts)))
    return CompletionResponse(
        id=job.response_id,
        created=job.created,
        model=job.model,
        choices=choices,
        usage=usage(job.num_prompt_tokens, completion_tokens, cached),
    )


def _returned(job: CompletionJob, finals: dict[int, RequestOutput]) -> list[RequestOutput]:
    """The outputs the response gives, prompt by prompt: all n in order, or, with best_of > n, the
    n candidates whose tokens have the highest mean log-probability, likeliest first."""
    returned = []
    for prompt in range(len(job.prompts)):
        candidates = [finals[prompt * job.best_of + sample] for sample in range(job.best_of)]
        if job.best_of > job.n:
            candidates.sort(key=lambda out: out.mean_logprob, reverse=True)  # stable: the first among equals
        returned.extend(candidates[: job.n])
    return returned


async def stream_completion(frontend: Frontend, job: CompletionJob) -> AsyncGenerator[str, None]:
    """SSE events: one chunk per engine output with news, a usage chunk if asked, then [DONE]."""
    states: dict[int, _ChoiceState] = {}
    cached: dict[int, int] = {}  # each prompt's first choice's prefix-cache hits
    # Each prompt's first sample's output that scored it (``scores_once``: the one that does), and
    # the outputs of its other choices held until then, where their first chunk leads with the
    # echoed prompt's log-probabilities.
    scored: dict[int, RequestOutput] = {}
    held: dict[int, list[RequestOutput]] = {}
    sent = False  # an error before anything was sent is raised (started_sse_response: its status)

    def events(outputs: list[tuple[int, RequestOutput]]) -> Iterator[str]:
        for index, out in outputs:
            state = states.setdefault(index, job.choice_state(index))
            chunk = _chunk(frontend.tokenizer, job, index, out, state, scored.get(index // job.n))
            if chunk is not None:
                if job.continuous_usage:
                    generated = sum(state.num_tokens for state in states.values())
                    chunk.usage = usage(job.num_prompt_tokens, generated, sum(cached.values()))
                yield sse_event(chunk.model_dump_json())

    try:
        async with aclosing(
            frontend.generate(job.request_id, job.prompts, job.params, job.n, job.timeout_s, scores_once=True)
        ) as stream:
            async for item in stream:
                prompt, sample = divmod(item.index, job.n)
                ready = [(item.index, item.output)]
                if sample == 0:
                    cached[item.index] = item.output.metrics.num_cached_tokens
                    if item.output.prompt_logprobs is not None and prompt not in scored:
                        scored[prompt] = item.output
                        ready += [
                            (i, out)
                            for i in range(item.index + 1, item.index + job.n)
                            for out in held.pop(i, [])
                        ]
                elif job.echo and job.logprobs is not None and prompt not in scored:
                    held.setdefault(item.index, []).append(item.output)
                    continue
                for text in events(ready):
                    sent = True
                    yield text
            # The first sample ended without scoring its prompt (it failed): the rest go without.
            for text in events([(index, out) for index, outs in sorted(held.items()) for out in outs]):
                sent = True
                yield text
        if job.include_usage:
            completion_tokens = sum(state.num_tokens for state in states.values())
            last = CompletionResponse(
                id=job.response_id,
                created=job.created,
                model=job.model,
                choices=[],
                usage=usage(job.num_prompt_tokens, completion_tokens, sum(cached.values())),
            )
            yield sse_event(last.model_dump_json())
    except ApiError as exc:
        if not sent:
            raise
        yield sse_event(error_event_payload(exc))
    yield SSE_DONE


def _chunk(
    tokenizer: Tokenizer,
    job: CompletionJob,
    index: int,
    out: RequestOutput,
    state: _ChoiceState,
    scored: RequestOutput | None,
) -> CompletionResponse | None:
    state.num_tokens = len(out.token_ids)
    text = out.new_text
    if not state.started:
        text = state.echo_text + text
        state.started = True
    reason = stream_finish_reason(out)
    logprobs = _logprobs(tokenizer, job, out.new_logprobs, state, scored)
    if not text and reason is None and logprobs is None:
        return None  # nothing new to say (text held back while it might start a stop string)
    choice = CompletionChoice(
        index=index, text=text, logprobs=logprobs, finish_reason=reason, stop_reason=out.stop_reason
    )
    if job.return_token_ids:  # the tokens of chunks left out above ride with this one
        if not state.prompt_ids_sent:
            choice.prompt_token_ids, state.prompt_ids_sent = job.prompt_token_ids(index), True
        choice.token_ids = list(out.token_ids[state.token_ids_sent :])
        state.token_ids_sent = len(out.token_ids)
    return CompletionResponse(id=job.response_id, created=job.created, model=job.model, choices=[choice])


def _logprobs(
    tokenizer: Tokenizer,
    job: CompletionJob,
    entries: list[TokenLogprobs],
    state: _ChoiceState,
    scored: RequestOutput | None,
) -> CompletionLogprobs | None:
    """Logprobs of these tokens, led by the echoed prompt's the first time they are there (from
    `scored`, the output of the prompt's sample that scored it); offsets continue from `state`
    (which they advance)."""
    num_top = job.logprobs
    if num_top is None:
        return None
    # With logprobs 0 too: each position's holds the sampled token (as vLLM answers).
    result = CompletionLogprobs(top_logprobs=[])
    if (
        job.echo
        and scored is not None
        and scored.prompt_logprobs is not None
        and not state.prompt_logprobs_sent
    ):
        state.prompt_logprobs_sent = True
        for token_id, entry in zip(scored.prompt_token_ids, scored.prompt_logprobs, strict=True):
            if entry is None:  # the first token: nothing before it to predict it from
                text = tokenizer.decode([token_id], skip_special_tokens=False)
                _append(result, token_name(tokenizer, token_id, job.tokens_as_ids), text, None, None, state)
            else:
                _append_entry(tokenizer, job, result, entry, state)
        # The prompt's offsets add up its tokens' texts one by one (a character split over two
        # tokens counts twice); the answer's start where the echoed text ends, whatever they came to.
        state.text_offset = len(state.echo_text)
    state.text_offset = max(state.text_offset, len(state.echo_text))
    for entry in entries:
        _append_entry(tokenizer, job, result, entry, state)
    return result


def _append_entry(
    tokenizer: Tokenizer,
    job: CompletionJob,
    result: CompletionLogprobs,
    entry: TokenLogprobs,
    state: _ChoiceState,
) -> None:
    as_ids = job.tokens_as_ids
    # The engine may have computed more alternatives than asked for here (prompt_logprobs beside echo).
    top = {token_name(tokenizer, t, as_ids): lp for t, lp in entry.top[: job.logprobs]}
    token = token_name(tokenizer, entry.token_id, as_ids)
    # The chosen token is always there, so up to logprobs + 1 entries (OpenAI's reference).
    top.setdefault(token, entry.logprob)
    text = token if not as_ids else tokenizer.decode([entry.token_id], skip_special_tokens=False)
    _append(result, token, text, entry.logprob, top, state)


def _append(
    result: CompletionLogprobs,
    token: str,
    text: str,
    logprob: float | None,
    top: dict[str, float] | None,
    state: _ChoiceState,
) -> None:
    """`token` as the answer names it; `text` its text, which the offsets count."""
    result.tokens.append(token)
    result.token_logprobs.append(logprob)
    result.text_offset.append(state.text_offset)
    state.text_offset += len(text)
    if result.top_logprobs is not None:
        result.top_logprobs.append(top)
