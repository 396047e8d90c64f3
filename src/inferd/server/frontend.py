"""The one Frontend behind every LLM protocol: prompts in, engine outputs out.

It renders chat templates, tokenizes and checks lengths (via `AsyncLLM.prepare`), builds validated
SamplingParams, fans a request with several prompts or `n > 1` out into engine requests, and records
metrics plus a log line for each engine request when it ends. Routes only translate protocols.

It also holds the server-side limits every protocol shares: the request timeout (a server default,
overridable per request), the most engine requests one request may make, refusing work while
draining for shutdown, and turning a full engine queue into a 429.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from inferd.engine.admission import EngineOverloadedError
from inferd.engine.async_llm import AsyncLLM, EngineDeadError
from inferd.engine.core import LoraUpdateError
from inferd.engine.input_processor import PRIORITY_NEEDS_POLICY
from inferd.engine.llm_engine import PromptError
from inferd.engine.outputs import RequestOutput
from inferd.engine.tokenizer import BrokenChatTemplateError, ChatTemplateError, InvalidTextError, Tokenizer
from inferd.sampling_params import SamplingParams, SamplingParamsError, params_of_sample
from inferd.server.errors import (
    GenerationError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    ServiceUnavailableError,
)
from inferd.server.metrics import FinishedRequest, ServerMetrics
from inferd.server.reasoning import ReasoningFormat
from inferd.structured.matcher import GrammarCompiler
from inferd.structured.spec import StructuredOutput, StructuredOutputError

logger = logging.getLogger("inferd.server.requests")

_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass(frozen=True)
class IndexedOutput:
    """An engine output tagged with its choice index: prompt_index * n + sample_index."""

    index: int
    output: RequestOutput


# The header that sets one request's timeout in seconds (overrides the server default).
TIMEOUT_HEADER = "X-Request-Timeout"

# The most engine requests one HTTP request may make: prompts x n (or best_of) on completions, one
# per input on embeddings, score, rerank, classify and pooling. A few bytes of JSON would otherwise
# queue tens of thousands (2,000 prompts x n=16 in 19 KiB). OpenAI's own limit on embedding inputs,
# so no request its API takes is refused here.
DEFAULT_MAX_ENGINE_REQUESTS = 2048


# The model names TGI's clients send where they know none (TGI ignores the field): "tgi", as TGI's
# documentation writes it, and "dummy", what huggingface_hub's InferenceClient sends to a URL. They
# ask for the base model, as they would of TGI; any other unknown name is still a 404.
TGI_PLACEHOLDER_MODELS = frozenset({"tgi", "dummy"})


def adapter_name_problem(name: str, served_names: Sequence[str]) -> str | None:
    """Why a LoRA adapter cannot be served under ``name`` (None where it can): a served model's
    name or a TGI client's placeholder would take that name's requests from the base model, and
    a comma would split it in ``lora_requests_info``'s comma-separated labels."""
    if name in served_names:
        return f"{name!r} is the served model's name: requests could not reach it"
    if name in TGI_PLACEHOLDER_MODELS:
        return f"{name!r} is what TGI's clients send for the base model"
    if "," in name:
        return f"{name!r} holds a comma, which the adapter metrics' labels separate names by"
    return None


class Frontend:
    def __init__(
        self,
        llm: AsyncLLM,
        model_name: str,
        metrics: ServerMetrics,
        request_timeout_s: float | None = None,
        sampling_defaults: Mapping[str, float | int] | None = None,
        reasoning_format: ReasoningFormat | None = None,
        tool_call_parser: str | None = None,
        aliases: tuple[str, ...] = (),
        max_engine_requests: int = DEFAULT_MAX_ENGINE_REQUESTS,
    ) -> None:
        self.llm = llm
        self.model_name = model_name
        # More names of the served model (--served-model-name's after the first).
        self.aliases = tuple(name for name in aliases if name != model_name)
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s
        # The most engine requests one client request may make (``check_fan_out``).
        self.max_engine_requests = max_engine_requests
        # For the OpenAI fields a request leaves out (`engine/generation_config.py`).
        self.sampling_defaults: Mapping[str, float | int] = sampling_defaults or {}
        # How chat answers split their thinking from the rest (--reasoning-parser); None: they don't.
        self.reasoning_format = reasoning_format
        # How chat answers' tool calls are read (--tool-call-parser); None: requests with tools are refused.
        self.tool_call_parser = tool_call_parser
        # Set by a graceful shutdown: new requests get a 503 while the ones in flight finish.
        self.draining = False
        self.num_in_flight = 0  # engine requests whose outputs are being consumed
        # Adapters a request made of several engine requests (a beam search) uses between them.
        self._adapter_holds: Counter[str] = Counter()
        config = llm.config
        self._grammars = GrammarCompiler(config.tokenizer_path / "tokenizer.json", config.model.vocab_size)
        # Where requests are prepared (`off_loop`): one thread, so they are taken in the order
        # they came, as on the event loop.
        self._preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferd-prepare")

    async def off_loop(self, work: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``work(*args, **kwargs)`` on the frontend's preparing thread, awaited. Requests are
        checked, rendered and tokenized there: tokenizing takes time as the text's length (seconds
        for the megabytes of text a long context admits) and the tokenizer lets go of the GIL
        meanwhile, so the event loop goes on streaming every other request's tokens. A client
        that leaves meanwhile drops its request's preparation if it is still queued (else it
        finishes, unused)."""
        queued = time.monotonic()
        metrics, preparing = self.metrics, self.metrics.preparing

        def prepare() -> _T:
            try:
                return work(*args, **kwargs)
            finally:  # counted here, on the thread: the work goes on if its client leaves
                preparing.dec()
                metrics.observe_prepared(time.monotonic() - queued)

        preparing.inc()
        try:
            queued_work = self._preparer.submit(prepare)
        except BaseException:  # the thread is gone (a closed frontend): nothing will run
            preparing.dec()
            raise
        try:
            return await asyncio.wrap_future(queued_work)
        except asyncio.CancelledError:
            if queued_work.cancel():  # still queued: dropped, so prepare() never counts it
                preparing.dec()
            raise

    def close(self) -> None:
        """Lets the preparing thread go once the preparations queued have run."""
        self._preparer.shutdown(wait=False)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.llm.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.llm.config.model.vocab_size

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.llm.eos_token_ids

    # -- checks and translation -----------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        self.adapter_for(name)

    @property
    def adapters(self) -> tuple[str, ...]:
        """The LoRA adapters served beside the base model (``--lora-modules``, and those loaded
        while serving)."""
        return self.llm.lora_names

    async def load_adapter(self, name: str, path: str) -> None:
        """Serve a LoRA adapter from ``path`` (on this machine) under ``name`` from now on."""
        problem = adapter_name_problem(name, (self.model_name, *self.aliases))
        if problem is not None:
            raise InvalidRequestError(f"lora_name: {problem}", "lora_name")
        await self._update_adapter(self.llm.load_adapter(name, path))

    async def unload_adapter(self, name: str) -> None:
        """Stop serving a LoRA adapter no request uses (in the engine, or a beam search between
        its steps)."""
        holds = self._adapter_holds[name]
        if holds:
            message = f"lora_name: the LoRA adapter {name!r} is in use by {holds} beam search(es)"
            raise InvalidRequestError(message, "lora_name")
        await self._update_adapter(self.llm.unload_adapter(name))
        self.metrics.forget_lora_adapter(name)

    @contextmanager
    def holding_adapter(self, name: str | None) -> Iterator[None]:
        """While inside, ``name`` (if any) cannot be unloaded."""
        if name is not None:
            self._adapter_holds[name] += 1
        try:
            yield
        finally:
            if name is not None:
                self._adapter_holds[name] -= 1
                if not self._adapter_holds[name]:  # no entry kept per adapter name ever held
                    del self._adapter_holds[name]

    async def _update_adapter(self, update: Awaitable[None]) -> None:
        try:
            await update
        except LoraUpdateError as exc:
            if exc.kind == "failed":
                raise GenerationError(str(exc)) from exc
            error = ModelNotFoundError if exc.kind == "not_found" else InvalidRequestError
            raise error(f"lora_name: {exc}", "lora_name") from exc
        except EngineDeadError as exc:
            raise ServiceUnavailableError(str(exc)) from exc

    def adapter_for(self, name: str | None, field: str = "model") -> str | None:
        """The LoRA adapter a request's model name asks for; None for the base model (its served
        name, no name, or a TGI client's placeholder); any other name is a 404."""
        if name is None or name == self.model_name or name in self.aliases:
            return None
        if name in self.adapters:
            return name
        if name in TGI_PLACEHOLDER_MODELS:
            return None
        served = ", ".join(repr(n) for n in (self.model_name, *self.aliases, *self.adapters))
        raise ModelNotFoundError(f"the model {name!r} does not exist; this server serves {served}", field)

    def answering_name(self, name: str | None) -> str:
        """The model name a response gives: the adapter asked for, else the served model's."""
        return self.adapter_for(name) or self.model_name

    @property
    def max_tokens_cap(self) -> int | None:
        return self.llm.config.scheduler.max_tokens_cap

    def check_alive(self) -> None:
        if self.llm.dead_reason is not None:  # the server drains once its engine died: say why
            raise ServiceUnavailableError(self.llm.dead_reason)
        if self.draining:
            raise ServiceUnavailableError("the server is shutting down")
        if not self.llm.is_alive:
            raise ServiceUnavailableError(self.llm.dead_reason or "the engine is not running")

    def check_ready(self, prompts: Sequence[list[int]], n: int = 1, field: str = "n") -> None:
        """Before a response starts: the engine runs, no drain, and the queue has room for these
        (``field``: what the client changes to ask for fewer)."""
        # First: a request too large to ever be served is the client's to change, whatever the state.
        self.check_fan_out(len(prompts), n, field)
        self.check_alive()
        max_requests = self.llm.admission.limits.max_requests
        if max_requests is not None and len(prompts) * n > max_requests:
            # Its engine requests could never all be queued at once, so a retry would not help.
            what = "generations (prompts x n)" if field == "n" else f"engine requests (one per {field})"
            raise InvalidRequestError(
                f"this request makes {len(prompts) * n} {what}, more than the {max_requests} this "
                f"server queues at once",
                field=field,
            )
        try:
            self.llm.admission.check(len(prompts) * n, sum(len(p) for p in prompts) * n)
        except EngineOverloadedError as exc:
            self.metrics.count_rejected()
            raise OverloadedError(str(exc), exc.retry_after_s) from exc

    def check_fan_out(self, prompts: int, samples: int = 1, field: str = "n") -> None:
        """A 400 naming ``field`` where ``prompts`` x ``samples`` engine requests are more than one
        request may make (``max_engine_requests``); checked before anything is queued."""
        total = prompts * samples
        if total <= self.max_engine_requests:
            return
        made = f"{prompts} prompts x {samples} samples" if samples > 1 else "one per prompt or input"
        raise InvalidRequestError(
            f"{field}: this request makes {total} engine requests ({made}), more than the "
            f"{self.max_engine_requests} one request may make; send fewer, or split it",
            field=field,
        )

    def timeout_s(self, header: str | None, body: float | None = None) -> float | None:
        """One request's timeout: the body field, else the header, else the server default."""
        if body is None and header is not None:
            try:
                body = float(header)
            except ValueError:
                raise InvalidRequestError(
                    f"{TIMEOUT_HEADER}: must be a number of seconds, got {header!r}", field=TIMEOUT_HEADER
                ) from None
        if body is None:
            return self.request_timeout_s
        # A route that reads its body itself (embeddings) hands the field over unchecked.
        if isinstance(body, bool) or not isinstance(body, (int, float)):
            raise InvalidRequestError(f"timeout: must be a number of seconds, got {body!r}", field="timeout")
        if not 0 < body <= 86400:  # also refuses NaN
            raise InvalidRequestError(f"timeout: must be in (0, 86400] seconds, got {body}", field="timeout")
        return body

    @staticmethod
    def new_request_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
        continue_final_message: bool = False,
    ) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt, template_kwargs, continue_final_message
            )
        except ChatTemplateError as exc:
            raise InvalidRequestError(str(exc), field="messages") from exc
        except BrokenChatTemplateError:
            # The model's fault, logged once at load with the file's path, which clients need not see.
            raise GenerationError(
                "the model's chat template does not compile; see the server's log"
            ) from None

    def sampling_params(self, field_names: Mapping[str, str] | None = None, **fields: Any) -> SamplingParams:
        """Validated SamplingParams; errors name the protocol's field (`field_names` maps ours to theirs)."""
        names = field_names or {}
        adapter = fields.get("adapter")
        if adapter is not None and adapter not in self.adapters:
            # Refused here, before the engine: a name never served is the client's mistake.
            field = names.get("adapter", "adapter")
            served = ", ".join(repr(name) for name in self.adapters) or "none"
            raise ModelNotFoundError(
                f"{field}: no LoRA adapter {adapter!r} is served (adapters: {served})", field
            )
        for name in ("logit_bias", "stop_token_ids", "allowed_token_ids"):
            self.check_token_ids(fields.get(name) or (), names.get(name, name))
        if fields.get("priority") and self.llm.config.scheduler.policy != "priority":
            field = names.get("priority", "priority")
            raise InvalidRequestError(
                f"{field}: " + PRIORITY_NEEDS_POLICY.format(fields["priority"]), field=field
            )
        cap, max_tokens = self.max_tokens_cap, fields.get("max_tokens")
        if cap is not None and max_tokens is not None and max_tokens > cap:
            field = names.get("max_tokens", "max_tokens")
            raise InvalidRequestError(
                f"{field}: this server allows at most {cap} output tokens per request, got {max_tokens}",
                field=field,
            )
        try:
            params = self.llm.resolve_bad_words(SamplingParams(**fields))
        except SamplingParamsError as exc:
            field = names.get(exc.field, exc.field)
            message = str(exc).replace(exc.field, field, 1)
            raise InvalidRequestError(message, field=field) from exc
        except PromptError as exc:  # a bad word that is not valid text
            field = names.get("bad_words", "bad_words")
            raise InvalidRequestError(str(exc), field=field) from exc
        if params.structured_output is not None:
            self.check_structured_output(
                params.structured_output, names.get("structured_output", "structured_output")
            )
        return params

    def check_structured_output(self, spec: StructuredOutput, field: str) -> None:
        """What SamplingParams' check, made without a tokenizer, cannot see, as the client's 4xx
        rather than a failed generation: a tokenizer llguidance cannot read (read once, on the
        first such request), and a grammar naming tokens the tokenizer lacks (<|special|>, <[id]>)."""
        try:
            self._grammars.check_tokenizer(self.eos_token_ids)
            if spec.grammar is not None:
                self._grammars.matcher_for(spec, self.eos_token_ids)
        except StructuredOutputError as exc:
            raise InvalidRequestError(f"{field}: {exc}", field=field) from exc

    def check_token_ids(self, token_ids: Sequence[int] | Mapping[int, float], field: str) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"{field}: token ids must be in [0, {self.vocab_size}), got {bad[:5]}", field=field
            )

    def truncated(
        self,
        prompt: str | list[int],
        keep: int,
        max_tokens: int | None,
        field: str = "prompt",
        add_special_tokens: bool = True,
    ) -> list[int]:
        """vLLM's ``truncate_prompt_tokens``: the prompt's last ``keep`` tokens (-1: as many as
        leave room in the context for ``max_tokens``; None: one token; 0: a pooling request's,
        which needs none). A text keeps the special tokens its tokenizer adds around it
        (``Tokenizer.encode_last``) unless ``add_special_tokens`` is false; token ids are cut as
        they are."""
        if keep == -1:
            keep = max(1, self.max_model_len - (1 if max_tokens is None else max_tokens))
        if not isinstance(prompt, str):
            return list(prompt)[-keep:]
        try:
            if not add_special_tokens:
                return self.tokenizer.encode(prompt, add_special_tokens=False, cut_to_fit=True)[-keep:]
            return self.tokenizer.encode_last(prompt, keep)
        except InvalidTextError as exc:
            raise InvalidRequestError(str(exc), field=field) from exc

    def prepare(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        field: str = "prompt",
        add_special_tokens: bool = True,
    ) -> list[int]:
        """Tokenize and check one prompt against the context; returns its token ids (a text's with
        its tokenizer's special tokens unless ``add_special_tokens`` is false)."""
        try:
            token_ids, _ = self.llm.prepare(prompt, params, add_special_tokens)
        except PromptError as exc:
            raise InvalidRequestError(str(exc), field=field) from exc
        return token_ids

    # -- generation -----------------------------------------------------------------------------
    def generate(
        self,
        request_id: str,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        n: int = 1,
        timeout_s: float | None = None,
        continuing: bool = False,
        *,
        records_asked: bool = True,
        scores_once: bool = False,
    ) -> AsyncGenerator[IndexedOutput, None]:
        """Outputs of every choice as they come; one engine request per (prompt, sample).
        ``continuing``: the next part of a request already under way (a beam search's later
        steps), which neither a drain nor the queue limits refuse. ``records_asked`` false: the
        requests' max_tokens and n are not the client's (a beam search's one-token steps, whose
        search records what the client asked once, ``ServerMetrics.record_asked``).
        ``scores_once``: only a prompt's first sample scores it (``prompt_logprobs``), where the
        caller gives that sample's scores to every choice of the prompt: scoring bypasses the
        prefix cache, so each sample would compute the prompt again.

        Engine request ids are `<request_id>-<choice index>`. With a seed, sample j of each prompt
        uses `seed + j`, so the choices differ from each other yet each is reproducible.
        After `timeout_s` (default: the server's) unfinished choices end with finish reason `timeout`.
        Closing the iterator early aborts every unfinished engine request.
        """
        if not continuing:
            self.check_ready(prompts, n)
        elif not self.llm.is_alive:
            raise ServiceUnavailableError(self.llm.dead_reason or "the engine is not running")
        timeout_s = timeout_s if timeout_s is not None else self.request_timeout_s
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        refusal = _Refusal()  # the client's request is refused once, however many samples find out
        streams = []
        for prompt_index, token_ids in enumerate(prompts):
            for sample in range(n):
                index = prompt_index * n + sample
                sample_params = params_of_sample(params, sample, scores_once)
                engine_id = f"{request_id}-{index}"
                # A prompt's first sample reports how many the prompt asked for.
                samples = n if records_asked and not sample else None
                streams.append(
                    self._tracked(
                        index,
                        engine_id,
                        token_ids,
                        sample_params,
                        deadline,
                        not continuing,
                        samples,
                        records_asked,
                        refusal,
                    )
                )
        if len(streams) == 1:
            return streams[0]
        return _merge(streams)

    async def _tracked(
        self,
        index: int,
        engine_id: str,
        token_ids: list[int],
        params: SamplingParams,
        deadline: float | None,
        admit: bool,
        n: int | None,
        records_asked: bool,
        refusal: _Refusal,
    ) -> AsyncGenerator[IndexedOutput, None]:
        """``n``: for a prompt's first sample, how many the prompt asked for (a metric).
        ``refusal``: shared by the engine requests of one client request."""
        structure = params.structured_output
        asked_tokens = params.max_tokens if records_asked and not params.embed else None
        tracker = _RequestTracker(
            engine_id, len(token_ids), self.metrics, structure.kinds[0] if structure else None,
            params.adapter, params.embed, asked_tokens, n,
        )  # fmt: skip
        self.num_in_flight += 1
        try:
            async for out in self.llm.generate(engine_id, token_ids, params, deadline, admit):
                if out.error is not None:
                    adapter = params.adapter
                    if out.finish_reason != "abort" and adapter is not None and adapter not in self.adapters:
                        # Unloaded between the request's checks and its turn in the engine: a 404, as
                        # a request for a model not served is, and neither a failure nor an
                        # adapter's request in the metrics.
                        tracker.done = True
                        raise ModelNotFoundError(f"the LoRA adapter {adapter!r} is no longer served")
                    tracker.finish(out)
                    if out.finish_reason == "abort":  # ended by the server (shutdown), not a failure
                        raise ServiceUnavailableError(out.error)
                    if out.client_fault:  # its limits or its grammar: what it asked cannot be done
                        raise InvalidRequestError(out.error)
                    raise GenerationError(out.error)
                tracker.on_output(out)
                yield IndexedOutput(index, out)
        except EngineOverloadedError as exc:
            tracker.done = True  # never admitted: not a finished request
            self.metrics.count_rejected(arrived=True, whole_request=not refusal.counted)
            refusal.counted = True
            raise OverloadedError(str(exc), exc.retry_after_s) from exc
        except EngineDeadError as exc:
            raise ServiceUnavailableError(str(exc)) from exc
        finally:
            self.num_in_flight -= 1
            tracker.abandon()


class _Refusal:
    """Whether a client request's refusal by the queue was counted: each of its engine requests
    (its samples, its prompts) may find the queue full as it is admitted."""

    def __init__(self) -> None:
        self.counted = False


class _RequestTracker:
    """Per engine request: inter-token gaps while it runs, metrics and one log line when it ends."""

    def __init__(
        self,
        engine_id: str,
        prompt_tokens: int,
        metrics: ServerMetrics,
        structure: str | None = None,
        adapter: str | None = None,
        embeds: bool = False,
        max_tokens: int | None = None,
        n: int | None = None,
    ) -> None:
        self.engine_id = engine_id
        self.max_tokens = max_tokens  # asked for (None: not given)
        self.n = n  # the samples its prompt asked for, on the prompt's first sample
        # An embedding request's one sampled token is dropped: it has no output tokens, and no
        # token times for the latency histograms.
        self.embeds = embeds
        self.prompt_tokens = prompt_tokens
        self.metrics = metrics
        self.structure = structure  # the kind of its structured output, if it has one
        self.adapter = adapter  # its LoRA adapter, if it has one
        self.start = time.monotonic()
        metrics.count_arrived()
        self.last_token_time: float | None = None
        self.first_token_time: float | None = None
        self.num_tokens = 0
        self.done = False

    def on_output(self, out: RequestOutput) -> None:
        if out.new_token_ids and not self.embeds:
            # One gap per token after the first. An output may carry several tokens (held back
            # for a stop string, or merged behind a slow reader): they share the time since the
            # last output.
            now = time.monotonic()
            count = len(out.new_token_ids)
            if self.last_token_time is None:
                self.first_token_time = now
                # Tokens that came with the first one were made since the engine saw it.
                count -= 1
                made = out.metrics.first_token_time
                gap = max(0.0, now - made) / count if count and made is not None else 0.0
            else:
                gap = (now - self.last_token_time) / count
            for _ in range(count):
                self.metrics.observe_inter_token(gap)
            self.last_token_time = now
            self.num_tokens = len(out.token_ids)
        if out.finished:
            self.finish(out)

    def finish(self, out: RequestOutput) -> None:
        m = out.metrics
        reason, tokens = out.finish_reason or "stop", len(out.token_ids)
        if self.embeds:
            reason = "stop" if out.embedding is not None else reason
            self._record(reason, 0, None, m.e2e_s, m.queue_s, m.prefill_s)
            return
        self._record(reason, tokens, m.ttft_s, m.e2e_s, m.queue_s, m.prefill_s, m.decode_s)

    def abandon(self) -> None:
        """The consumer left before the end: the engine aborts the request; count it as aborted."""
        if not self.done:
            ttft = None if self.first_token_time is None else self.first_token_time - self.start
            self._record("abort", self.num_tokens, ttft, time.monotonic() - self.start, None)

    def _record(
        self,
        reason: str,
        output_tokens: int,
        ttft: float | None,
        e2e: float | None,
        queue: float | None,
        prefill: float | None = None,
        decode: float | None = None,
    ) -> None:
        self.done = True
        self.metrics.record_finished(
            FinishedRequest(
                reason,
                self.prompt_tokens,
                output_tokens,
                ttft,
                e2e,
                queue,
                prefill,
                decode,
                self.max_tokens,
                self.n,
            )
        )
        if self.structure is not None:  # counted as it ends, as the finished requests are
            self.metrics.count_structured_output(self.structure)
        if self.adapter is not None:
            self.metrics.count_lora_request(self.adapter)
        logger.info(
            "request %s finished: %s, prompt %d tokens, output %d tokens, ttft %s, total %s",
            self.engine_id,
            reason,
            self.prompt_tokens,
            output_tokens,
            _seconds(ttft),
            _seconds(e2e),
        )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


_DONE = object()


async def _merge(streams: list[AsyncGenerator[IndexedOutput, None]]) -> AsyncGenerator[IndexedOutput, None]:
    """Interleave several output streams as their items arrive; closing it closes them all.

    The hand-off holds one item per stream: a slow reader leaves the backlog in the engine's
    per-request queues, where it is merged into multi-token outputs, not here one per token."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=len(streams))

    async def pump(stream: AsyncIterator[IndexedOutput]) -> None:
        # Cancellation (the reader has gone) passes through: nobody would read what is put then.
        try:
            async with aclosing(stream):  # type: ignore[type-var]
                async for item in stream:
                    await queue.put(item)
        except Exception as exc:  # handed to the reader, which raises it and closes the rest
            await queue.put(exc)
        else:
            await queue.put(_DONE)

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
