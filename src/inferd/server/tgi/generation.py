"""TGI generation: request -> Frontend job -> `GenerateResponse` or `StreamResponse` events."""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field

from starlette.responses import JSONResponse

from inferd.engine.outputs import RequestOutput
from inferd.sample.sampler import TokenLogprobs
from inferd.sampling_params import SamplingParams, sample_seed
from inferd.server.errors import (
    ApiError,
    ErrorKind,
    GenerationError,
    InvalidRequestError,
    RequestTimeoutError,
)
from inferd.server.frontend import Frontend
from inferd.server.streaming import sse_event
from inferd.server.structured_request import response_format
from inferd.server.tgi.protocol import (
    BestOfSequence,
    Details,
    FinishReason,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    StreamDetails,
    StreamResponse,
    Token,
)

MAX_STOP_SEQUENCES = 16
# TGI's launcher default for --max-best-of.
DEFAULT_MAX_BEST_OF = 2

# status, TGI error_type
_ERROR_SHAPES: dict[ErrorKind, tuple[int, str]] = {
    "invalid_request": (422, "validation"),
    "not_found": (404, "not_found"),
    "authentication": (401, "authentication"),
    "generation": (424, "generation"),
    "unavailable": (503, "unhealthy"),
    "overloaded": (429, "overloaded"),
    "timeout": (408, "timeout"),
    "too_large": (413, "validation"),
}


def error_response(error: ApiError) -> JSONResponse:
    status, error_type = _ERROR_SHAPES[error.kind]
    return JSONResponse({"error": error.message, "error_type": error_type}, status_code=status)


def _error_event(error: ApiError) -> str:
    return sse_event(json.dumps({"error": error.message, "error_type": _ERROR_SHAPES[error.kind][1]}))


@dataclass(frozen=True)
class TgiJob:
    request_id: str
    prompt: list[int]
    prompt_text: str
    params: SamplingParams
    details: bool
    full_text: bool
    timeout_s: float | None = None  # None: the server's default
    # Candidates sampled; the answer is the one whose tokens have the highest mean log-probability.
    best_of: int = 1
    # When the route took the request (monotonic seconds): the start of TGI's timing headers.
    received_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Generated:
    """A whole answer, with TGI's timing headers of the sequence it gives."""

    response: GenerateResponse
    headers: dict[str, str]


def max_input_tokens(frontend: Frontend) -> int:
    """The longest prompt a request may have (TGI's ``max_input_tokens``): one token of the context
    is left to generate."""
    return frontend.max_model_len - 1


def prepare_generate(
    frontend: Frontend, body: GenerateRequest, stream: bool = False, max_best_of: int = 1
) -> TgiJob:
    """``max_best_of``: the most candidates a request may ask for (TGI's ``--max-best-of``)."""
    received_at = time.monotonic()
    p = body.parameters
    _refuse_unsupported(p)
    _check_tgi_ranges(p, max_input_tokens(frontend))
    best_of = _checked_best_of(p, stream, max_best_of)
    if p.decoder_input_details and stream:  # as TGI: the prompt's tokens come in the details only
        raise InvalidRequestError(
            "decoder_input_details == true is not supported when streaming tokens", "decoder_input_details"
        )
    max_tokens, cap = p.max_new_tokens, frontend.max_tokens_cap
    if "max_new_tokens" not in p.model_fields_set and max_tokens is not None and cap is not None:
        max_tokens = min(max_tokens, cap)  # TGI's implicit default, not the client's ask: capped
    params = frontend.sampling_params(
        field_names={
            "max_tokens": "max_new_tokens",
            "logprobs": "top_n_tokens",
            "structured_output": "grammar",
        },
        max_tokens=max_tokens,
        temperature=(p.temperature or 1.0) if p.sampling else 0.0,
        top_k=p.top_k or 0,
        top_p=p.top_p or 1.0,
        typical_p=p.typical_p or 1.0,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        # TGI reports the seed of a sampled answer, so pick one when the client did not; a greedy
        # answer has none (null in its details, as TGI's).
        seed=(p.seed if p.seed is not None else random.getrandbits(63)) if p.sampling else None,
        stop=p.stop,
        # TGI's generated text ends with the stop sequence that ended it.
        include_stop_str_in_output=True,
        # TGI gives every token's logprob; top_n_tokens asks for alternatives as well.
        logprobs=p.top_n_tokens or 0,
        # decoder_input_details: the prompt's tokens, each with its log-probability, in the details.
        prompt_logprobs=0 if p.decoder_input_details and p.details else None,
        # TGI's grammar object: {"type": "json" | "regex" | "json_schema", "value": ...}.
        structured_output=response_format(p.grammar, "grammar") if p.grammar is not None else None,
        # TGI's LoRA field: an adapter the server was started with (--lora-modules).
        adapter=frontend.adapter_for(p.adapter_id, "adapter_id"),
    )
    token_ids = frontend.tokenizer.encode(body.inputs)
    if p.truncate is not None:
        token_ids = token_ids[-p.truncate :]
    return TgiJob(
        request_id=frontend.new_request_id("tgi"),
        prompt=frontend.prepare(token_ids, params, field="inputs"),
        prompt_text=body.inputs,
        params=params,
        details=p.details,
        full_text=bool(p.return_full_text),
        best_of=best_of,
        received_at=received_at,
    )


def _checked_best_of(p: GenerateParameters, stream: bool, max_best_of: int) -> int:
    """TGI's rules for ``best_of`` > 1: not streamed, sampled, unseeded (each candidate gets a
    seed of its own, reported in the details), and at most the server's ``max_best_of``."""
    best_of = p.best_of or 1
    if best_of == 1:
        return 1
    if stream:
        raise InvalidRequestError("best_of != 1 is not supported when streaming tokens", "best_of")
    if not p.sampling:
        raise InvalidRequestError("you must use sampling when best_of is > 1", "best_of")
    if p.seed is not None:
        raise InvalidRequestError("seed must not be set when best_of > 1", "seed")
    if best_of > max_best_of:
        raise InvalidRequestError(
            f"best_of must be > 0 and <= {max_best_of} (the server's --max-best-of). Given: {best_of}",
            "best_of",
        )
    return best_of


def _check_tgi_ranges(p: GenerateParameters, max_input: int) -> None:
    """TGI's validation (its router's), with its messages: top_p strictly between 0 and 1 (1 is
    refused, not read as "off"), and truncate from 1 to the model's input tokens."""
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise InvalidRequestError("`top_p` must be > 0.0 and < 1.0", "top_p")
    if p.truncate is not None and not 0 < p.truncate <= max_input:
        raise InvalidRequestError(
            f"`truncate` must be strictly positive and less than {max_input}. Given: {p.truncate}", "truncate"
        )


def _refuse_unsupported(p: GenerateParameters) -> None:
    if p.watermark:
        raise InvalidRequestError("watermark is not supported by this server", "watermark")
    if len(p.stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequestError(
            f"stop: at most {MAX_STOP_SEQUENCES} stop sequences, got {len(p.stop)}", "stop"
        )


async def generate(frontend: Frontend, job: TgiJob) -> Generated:
    finals: dict[int, RequestOutput] = {}
    async with aclosing(
        # The first candidate scores the prompt (decoder_input_details) for all of them.
        frontend.generate(
            job.request_id, [job.prompt], job.params, n=job.best_of, timeout_s=job.timeout_s, scores_once=True
        )
    ) as stream:
        async for item in stream:
            if item.output.finished:
                finals[item.index] = item.output
    assert len(finals) == job.best_of, "the Frontend ends every stream with a finished output"
    candidates = [finals[index] for index in range(job.best_of)]
    for out in candidates:
        _finish_reason(frontend, job.params, out)  # one timed out or cut short: its error, not a text
    # As TGI: the highest mean log-probability of the generated tokens, the first among equals.
    best = max(range(job.best_of), key=lambda index: candidates[index].mean_logprob)
    final = candidates[best]
    scored = candidates[0].prompt_logprobs  # ``scores_once``: the first candidate's
    details = None
    if job.details:
        details = Details(**_sequence_details(frontend, job, final, best, scored))
        if job.best_of > 1:
            details.best_of_sequences = [
                BestOfSequence(
                    generated_text=_text(job, out), **_sequence_details(frontend, job, out, index, scored)
                )
                for index, out in enumerate(candidates)
                if index != best
            ]
    response = GenerateResponse(generated_text=_text(job, final), details=details)
    return Generated(response, timing_headers(frontend, job, final))


def timing_headers(frontend: Frontend, job: TgiJob, out: RequestOutput) -> dict[str, str]:
    """TGI's headers of a whole answer: its times in milliseconds (total from the route taking the
    request; validation, its checks and tokenization until the engine queued it; queue, until first
    scheduled; inference, from then to the end, and that per generated token), the total once
    more in seconds (`x-compute-time`), the prompt's characters and tokens, the tokens generated,
    and the device that computed them (`x-compute-type`)."""
    now = time.monotonic()
    metrics = out.metrics
    started = metrics.first_scheduled_time if metrics.first_scheduled_time is not None else now
    inference_s = now - started
    generated = len(out.token_ids)

    def ms(seconds: float) -> str:
        return str(int(max(0.0, seconds) * 1000))

    return {
        "x-compute-type": frontend.llm.config.device,
        "x-compute-time": str(now - job.received_at),
        "x-compute-characters": str(len(job.prompt_text)),
        "x-total-time": ms(now - job.received_at),
        "x-validation-time": ms(metrics.arrival_time - job.received_at),
        "x-queue-time": ms(started - metrics.arrival_time),
        "x-inference-time": ms(inference_s),
        "x-time-per-token": ms(inference_s / max(1, generated)),
        "x-prompt-tokens": str(len(job.prompt)),
        "x-generated-tokens": str(generated),
    }


def _text(job: TgiJob, out: RequestOutput) -> str:
    return job.prompt_text + out.text if job.full_text else out.text


def _sequence_details(
    frontend: Frontend,
    job: TgiJob,
    out: RequestOutput,
    sample: int,
    scored: list[TokenLogprobs | None] | None,
) -> dict[str, object]:
    """The details of candidate ``sample``: its summary, prompt (with ``scored``, the prompt's
    scores, when asked) and generated tokens."""
    prefill = [
        _token(frontend, token_id, None, None if entry is None else entry.logprob)
        for token_id, entry in zip(out.prompt_token_ids, scored, strict=True)
    ] if scored is not None else []  # fmt: skip
    return {
        **_stream_details(frontend, job, out, sample).model_dump(),
        "prefill": prefill,
        "tokens": [_token(frontend, e.token_id, None, e.logprob) for e in out.logprobs],
        "top_tokens": _top_tokens(frontend, out.logprobs) if job.params.logprobs else None,
    }


async def stream_generate(frontend: Frontend, job: TgiJob) -> AsyncGenerator[str, None]:
    """One event per generated token; the last one carries the whole text (and details if asked)."""
    index = 0
    sent = False  # an error before anything was sent is raised (started_sse_response: its status)
    try:
        async with aclosing(
            frontend.generate(job.request_id, [job.prompt], job.params, timeout_s=job.timeout_s)
        ) as stream:
            async for item in stream:
                out = item.output
                summary = _stream_details(frontend, job, out) if out.finished else None
                entries = out.new_logprobs
                for position, entry in enumerate(entries):
                    index += 1
                    last = position == len(entries) - 1
                    # The text delta rides on the output's last token, so events never split a character.
                    # A special token that adds no text (the EOS that ends the answer) shows its own, as
                    # in TGI's events; generated_text leaves it out.
                    delta = out.new_text if last else ""
                    special = entry.token_id in frontend.tokenizer.special_token_ids
                    event = StreamResponse(
                        index=index,
                        token=_token(
                            frontend, entry.token_id, None if special and not delta else delta, entry.logprob
                        ),
                        top_tokens=_top_tokens(frontend, [entry])[0] if job.params.logprobs else None,
                    )
                    if last and out.finished:
                        event.generated_text = job.prompt_text + out.text if job.full_text else out.text
                        event.details = summary if job.details else None
                    sent = True
                    yield sse_event(event.model_dump_json())
    except ApiError as exc:
        if not sent:
            raise
        yield _error_event(exc)


def _token(frontend: Frontend, token_id: int, text: str | None, logprob: float | None) -> Token:
    if text is None:
        text = frontend.tokenizer.decode([token_id], skip_special_tokens=False)
    return Token(
        id=token_id, text=text, logprob=logprob, special=token_id in frontend.tokenizer.special_token_ids
    )


def _top_tokens(frontend: Frontend, entries: list[TokenLogprobs]) -> list[list[Token]]:
    return [[_token(frontend, t, None, lp) for t, lp in entry.top] for entry in entries]


def _stream_details(frontend: Frontend, job: TgiJob, out: RequestOutput, sample: int = 0) -> StreamDetails:
    """``sample``: which of a ``best_of`` request's candidates ``out`` is (its seed is its own)."""
    seed = job.params.seed
    return StreamDetails(
        finish_reason=_finish_reason(frontend, job.params, out),
        generated_tokens=len(out.token_ids),
        input_length=len(job.prompt),
        seed=None if seed is None else sample_seed(seed, sample),
    )


def _finish_reason(frontend: Frontend, params: SamplingParams, out: RequestOutput) -> FinishReason:
    if out.finish_reason == "length":
        return "length"
    if out.finish_reason == "stop":
        ended_on_eos = bool(out.token_ids) and out.token_ids[-1] in frontend.eos_token_ids
        # A grammar that allows nothing more ends the text as EOS would (TGI ends it on EOS).
        ended_on_stop = any(out.text.endswith(stop) for stop in params.stop)
        whole = params.structured_output is not None and not ended_on_stop
        return "eos_token" if ended_on_eos or whole else "stop_sequence"
    if out.finish_reason == "timeout":
        raise RequestTimeoutError("the request timed out and was aborted")
    raise GenerationError(f"the request ended early: {out.finish_reason}")
