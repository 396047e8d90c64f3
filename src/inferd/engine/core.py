"""EngineCore: the step loop that ties scheduler, KV cache and model runner together."""

from __future__ import annotations

import bisect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferd.config import EngineConfig, ModelLoadError
from inferd.engine.outputs import EngineCoreOutput
from inferd.engine.request import FinishReason, Request, RequestFault
from inferd.kv.manager import KVCacheManager, kv_window
from inferd.sample.penalties import reads_history_on_host
from inferd.sample.sampler import TokenLogprobs
from inferd.sched.output import SchedulerOutput
from inferd.sched.proposer import make_proposer
from inferd.sched.scheduler import Scheduler
from inferd.structured.matcher import GrammarCompiler
from inferd.worker.model_runner import LaunchedStep, ModelRunner, ModelRunnerOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_preemptions: int
    prefix_queries: int
    prefix_hits: int
    # Device memory torch holds in the core's process (reserved: weights, KV cache, graph pools,
    # cached blocks); None on the CPU. Read here, so it is right when the core is a child process.
    device_memory_bytes: int | None = None
    # Speculative decoding: steps a request ran proposed tokens in, the tokens, those accepted.
    spec_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    # Share of a draft model's KV blocks in use; None without a draft model.
    draft_kv_usage: float | None = None
    # Steps launched by the tokens they computed: a count per bound of STEP_TOKEN_BUCKETS (tokens
    # up to it, above the one before), then those above the last; and the tokens in all.
    step_token_counts: tuple[int, ...] = ()
    step_tokens: int = 0
    # Prompt tokens computed (prefix-cache hits left out) and output tokens generated, in all:
    # the rates of the server's periodic log line.
    prompt_tokens_computed: int = 0
    generated_tokens: int = 0
    # An engine that serves LoRA adapters: the adapters of the running and the waiting requests
    # (each named once, sorted) and how many it serves; None without adapters.
    running_adapters: tuple[str, ...] | None = None
    waiting_adapters: tuple[str, ...] | None = None
    num_adapters: int = 0
    # Requests put off (once per wait) because a running request was computing their prompt's next
    # block, which they then took from the prefix cache (`sched/prefixes_in_flight.py`).
    prefix_waits: int = 0


# Upper bounds of the tokens-per-step histogram (vLLM's iteration_tokens_total): decode steps of
# a few sequences at the bottom, chunked prompt steps of a full token budget at the top.
STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class LoraUpdateError(ValueError):
    """A LoRA adapter could not be loaded or unloaded; ``kind`` says why: ``invalid`` (not allowed,
    a taken name, a folder that does not hold an adapter of this model), ``not_found``, ``in_use``,
    or ``failed`` (the engine's fault, such as its device memory; it serves on as before)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class EngineCore:
    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None) -> None:
        assert config.cache.num_blocks is not None, "resolve the KV budget before building the core"
        self.config = config
        self.runner = runner or ModelRunner(config)
        self.runner.allocate_kv_cache(config.cache.num_blocks)
        if self.runner.uses_cuda_graphs():
            self.runner.capture_decode_graphs()
        if config.uses_warm_up:
            self.runner.warm_up()  # after the capture: its decode step replays a graph
        self.kv = KVCacheManager(
            config.cache.num_blocks,
            config.cache.block_size,
            config.cache.enable_prefix_caching,
            kv_window(config.model.layer_windows),
        )
        self.scheduler = Scheduler(config.scheduler, self.kv, make_proposer(config, config.cache.num_blocks))
        self.async_scheduling = config.uses_async_scheduling
        self._in_flight: LaunchedStep | None = None  # launched, tokens not read yet (async only)
        self._step_token_counts = [0] * (len(STEP_TOKEN_BUCKETS) + 1)
        self._step_tokens = 0
        self._prompt_tokens_computed = 0
        self._generated_tokens = 0
        self.grammars = GrammarCompiler(config.tokenizer_path / "tokenizer.json", config.model.vocab_size)
        # Each served adapter's prefix-cache salt, "<load>:<name>" (start-up adapters load 0): an
        # adapter loaded again under a name used before gets a new one, so blocks its predecessor
        # cached are never taken for its own; the load number first, so no two names' salts meet.
        self._adapter_salts = {name: f"0:{name}" for name in config.lora_names}
        self._adapter_loads = 0

    def add_request(self, request: Request) -> None:
        """Queue a request; a ValueError says why it cannot be (its structured-output constraint
        does not compile over this tokenizer, its adapter is not served, say)."""
        adapter = request.params.adapter
        if adapter is not None:
            if adapter not in self._adapter_salts:
                raise ValueError(f"no LoRA adapter {adapter!r} is served")
            request.cache_salt = self._adapter_salts[adapter]
        if request.params.cache_salt is not None:
            # Both parts, unambiguously: the adapter's K/V, shared only under the same user salt.
            request.cache_salt = json.dumps([request.cache_salt, request.params.cache_salt])
        spec = request.params.structured_output
        if spec is not None:
            request.grammar = self.grammars.matcher_for(spec, request.eos_token_ids)
        self.scheduler.add(request)

    def load_adapter(self, name: str, path: str) -> None:
        """Serve a LoRA adapter from now on (LoraUpdateError: not allowed, the name is taken, or
        the folder does not hold an adapter of this model)."""
        self._check_updatable()
        if name in self._adapter_salts:
            raise LoraUpdateError(f"the LoRA adapter {name!r} is already loaded", "invalid")
        try:
            self.runner.load_adapter(name, Path(path))
        except ModelLoadError as exc:
            raise LoraUpdateError(str(exc), "invalid") from None
        except Exception as exc:  # out of device memory, say: the runner kept what it served before
            logger.error("loading the LoRA adapter %r failed: %r", name, exc)
            raise LoraUpdateError(f"loading the LoRA adapter {name!r} failed: {exc!r}", "failed") from exc
        self._adapter_loads += 1
        self._adapter_salts[name] = f"{self._adapter_loads}:{name}"

    def unload_adapter(self, name: str) -> None:
        """Stop serving a LoRA adapter that no waiting or running request uses (LoraUpdateError)."""
        self._check_updatable()
        if name not in self._adapter_salts:
            raise LoraUpdateError(f"no LoRA adapter {name!r} is loaded", "not_found")
        users = [r for r in (*self.scheduler.waiting, *self.scheduler.running) if r.params.adapter == name]
        if users:
            raise LoraUpdateError(f"the LoRA adapter {name!r} is in use by {len(users)} request(s)", "in_use")
        self.runner.unload_adapter(name)
        del self._adapter_salts[name]

    def _check_updatable(self) -> None:
        if not self.config.allow_runtime_lora_updating:
            raise LoraUpdateError("this engine was not started with allow_runtime_lora_updating", "invalid")

    def shutdown(self) -> None:
        """Release what outlives the process's own memory: the other tensor-parallel ranks."""
        self.runner.shutdown()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix, the draft model's too (the requests running keep their
        blocks; no later request finds them)."""
        if self.scheduler.proposer is not None:
            self.scheduler.proposer.reset_prefix_cache()
        dropped = self.kv.reset_prefix_cache()
        logger.info("prefix cache reset: %d cached blocks forgotten", dropped)
        running = self.scheduler.num_running
        if running:  # the blocks they fill from now on are cached again
            logger.warning("prefix cache reset with %d request(s) running: the blocks they fill next are "
                           "cached again, so the next prompts need not start cold", running)  # fmt: skip

    def abort(self, request_ids: list[str], reason: FinishReason = FinishReason.ABORT) -> None:
        for request_id in request_ids:
            self.scheduler.finish(request_id, reason)

    def has_unfinished(self) -> bool:
        # A step still in flight whose requests have all finished (aborted, say) need not be read:
        # its tokens would be dropped. The next step() reads it, or it is never needed.
        return self.scheduler.has_unfinished()

    def step(self) -> list[EngineCoreOutput]:
        """Run one step; returns the tokens that came back.

        With asynchronous scheduling a step's tokens come back from the next call: each call
        schedules and launches step N+1, then waits for step N's tokens, so the host's work (the
        results, the outputs, the next schedule) runs while the device computes.
        """
        in_flight, self._in_flight = self._in_flight, None
        # Before any launch: a finished request's id may come back as a newer request's.
        self.runner.forget(self.scheduler.take_finished_ids())
        sched_out: SchedulerOutput | None = None
        launched: LaunchedStep | None = None
        read: LaunchedStep | None
        try:
            if in_flight is not None and _samples_need_history(in_flight):
                read = in_flight  # the host needs those tokens before sampling again
            else:
                sched_out = self.scheduler.schedule()
                launched = None if sched_out.is_empty else self.runner.launch(sched_out, in_flight)
                if launched is not None:
                    self._count_step(sched_out)
                read = in_flight if self.async_scheduling else launched
            runner_out = self.runner.collect(read) if read is not None else None
            # Kept only once the read succeeded: a failed read undoes this step too.
            if self.async_scheduling and sched_out is not None:
                self._in_flight = launched
        except BaseException:
            # Lost steps are undone, newest first, so a later step() runs them again (a seeded
            # request draws the same again: its draws are keyed by output position).
            for lost in (sched_out, in_flight.scheduled if in_flight is not None else None):
                if lost is not None:
                    self.scheduler.unschedule(lost)
            raise
        if read is None or runner_out is None:
            return []
        outputs = self._apply(read, runner_out)
        # The requests this step finished let go of their sampler state now, not at the next step:
        # an engine left idle keeps none (a step already in flight sampled at its launch).
        self.runner.forget(self.scheduler.take_finished_ids())
        return outputs

    def _count_step(self, sched_out: SchedulerOutput) -> None:
        tokens = sched_out.num_batched_tokens
        self._step_token_counts[bisect.bisect_left(STEP_TOKEN_BUCKETS, tokens)] += 1
        self._step_tokens += tokens
        for seq in sched_out.sequences:  # the chunks' prompt positions (a decode row has none)
            prompt_end = seq.request.num_prompt_tokens
            if seq.start_pos < prompt_end:
                self._prompt_tokens_computed += (
                    min(seq.start_pos + seq.num_tokens, prompt_end) - seq.start_pos
                )

    def _apply(self, step: LaunchedStep, runner_out: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """A read step's results into the scheduler, and its outputs.

        Requests whose sampling failed end here, alone; update() skips them as finished. The
        identity check matters with a step in flight: the id may belong to a newer request by now.
        """
        current = self.scheduler.requests
        failed = [
            EngineCoreOutput(
                r.request_id,
                None,
                None,
                FinishReason.ERROR.value,
                error=str(message),  # a plain str: an engine process's encoder takes no subclass
                client_fault=isinstance(message, RequestFault),
            )
            for r in step.requests
            if (message := runner_out.errors.get(r.request_id)) is not None
            and current.get(r.request_id) is r
            and self.scheduler.finish(r.request_id, FinishReason.ERROR) is not None
        ]
        if runner_out.prompt_logprobs:  # only steps that scored a prompt pay for the lookup
            # The identity check matters with a step in flight: the id may belong to a newer request.
            scheduled = {seq.request.request_id: seq.request for seq in step.scheduled.sequences}
            for request_id, (first, found) in runner_out.prompt_logprobs.items():
                request = current.get(request_id)
                if request is not None and request is scheduled.get(request_id):
                    _record_prompt_logprobs(request, first, found)
        advanced = self.scheduler.update(step.scheduled, runner_out.sampled)
        self._generated_tokens += sum(count for _, count in advanced)
        refused, complete = self._advance_grammars(advanced)
        outputs = failed
        for r, count in advanced:
            logprobs = runner_out.logprobs.get(r.request_id)
            if count > 1:  # speculative decoding: the accepted guesses, each an output of its own
                first = len(r.output_token_ids) - count
                outputs.extend(
                    EngineCoreOutput(
                        r.request_id,
                        r.output_token_ids[first + i],
                        logprobs[i] if logprobs is not None else None,
                        None,
                    )
                    for i in range(count - 1)
                )
            outputs.append(
                EngineCoreOutput(
                    request_id=r.request_id,
                    new_token_id=r.output_token_ids[-1],
                    logprobs=logprobs[count - 1] if logprobs is not None else None,
                    finish_reason=r.finish_reason.value if r.finish_reason else None,
                    error=None if (problem := refused.get(r.request_id)) is None else str(problem),
                    client_fault=isinstance(problem, RequestFault),
                    structure_complete=r.request_id in complete,
                    num_cached_tokens=r.num_cached_tokens,
                    first_scheduled_time=r.first_scheduled_time,
                    prompt_logprobs=_prompt_logprobs_of(r)
                    if r.params.prompt_logprobs is not None and len(r.output_token_ids) == 1
                    else None,
                    embedding=runner_out.embeddings.get(r.request_id) if r.params.embed else None,
                )
            )
        return outputs

    def _advance_grammars(self, advanced: list[tuple[Request, int]]) -> tuple[dict[str, str], set[str]]:
        """Move constrained requests past their new token (one a step: they never run proposed
        tokens). One whose grammar allows nothing more is done (a stop, as at EOS, but its last
        token is text); one whose token it refuses (a row left with no allowed token, as where
        ``allowed_token_ids`` or ``bad_words`` leave the constraint nothing) ends with an error, also
        when that token ended it (an EOS, the last token a length allows). So does one whose
        grammar fails (its own request alone). Returns the errors by request id, and the ids of
        the requests done."""
        refused: dict[str, str] = {}
        complete: set[str] = set()
        for request, _ in advanced:
            grammar = request.grammar
            if grammar is None or request.finish_reason not in (None, FinishReason.STOP, FinishReason.LENGTH):
                continue
            try:
                if not grammar.active:  # the output is free until it ends with the grammar's trigger
                    grammar.watch(request.output_token_ids)
                    continue
                refusal = grammar.accept(request.output_token_ids[-1])
                # The grammar refusing the token drawn (no token left it, or the grammar the
                # request gave cannot go on: too large, endless) is the request's own fault.
                problem: str | None = None if refusal is None else RequestFault(refusal)
                done = problem is None and request.finish_reason is None and grammar.complete
            except Exception as exc:
                logger.error("structured output of request %s failed: %r", request.request_id, exc)
                problem, done = f"the structured output failed: {exc}", False
            if problem is not None:
                refused[request.request_id] = problem
                if request.finish_reason is None:
                    self.scheduler.finish(request.request_id, FinishReason.ERROR)
                else:  # ended by that very token: already out of the scheduler
                    request.finish_reason = FinishReason.ERROR
            elif done:
                complete.add(request.request_id)
                self.scheduler.finish(request.request_id, FinishReason.STOP)
        return refused, complete

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_usage=self.kv.usage(),
            num_preemptions=self.scheduler.num_preemptions,
            prefix_queries=self.kv.prefix_queries,
            prefix_hits=self.kv.prefix_hits,
            device_memory_bytes=self.runner.device_memory_bytes(),
            spec_drafts=self.scheduler.num_drafts,
            spec_draft_tokens=self.scheduler.num_draft_tokens,
            spec_accepted_tokens=self.scheduler.num_accepted_tokens,
            draft_kv_usage=self.scheduler.proposer.cache_usage() if self.scheduler.proposer else None,
            step_token_counts=tuple(self._step_token_counts),
            step_tokens=self._step_tokens,
            prompt_tokens_computed=self._prompt_tokens_computed,
            generated_tokens=self._generated_tokens,
            prefix_waits=self.scheduler.num_prefix_waits,
            **self._adapter_stats(),
        )

    def _adapter_stats(self) -> dict[str, Any]:
        """Which adapters the running and waiting requests use (the gateway's LoRA affinity reads
        them from the metrics); nothing for an engine that serves none."""
        if not (self._adapter_salts or self.config.allow_runtime_lora_updating):
            return {}
        running = sorted({r.params.adapter for r in list(self.scheduler.running) if r.params.adapter})
        waiting = sorted({r.params.adapter for r in list(self.scheduler.waiting) if r.params.adapter})
        return {
            "running_adapters": tuple(running),
            "waiting_adapters": tuple(waiting),
            "num_adapters": len(self._adapter_salts),
        }


def _record_prompt_logprobs(request: Request, first: int, found: list[TokenLogprobs]) -> None:
    """Prompt tokens ``first``, ``first + 1``, ...'s log-probabilities into the request's list (a
    prompt computed again after a preemption writes the same values over its own)."""
    entries = request.prompt_logprobs
    if not entries:
        entries.extend([None] * request.num_prompt_tokens)
    entries[first : first + len(found)] = found


def _prompt_logprobs_of(request: Request) -> list[TokenLogprobs | None]:
    """One entry per prompt token; a one-token prompt has nothing before its token to score it."""
    return list(request.prompt_logprobs) or [None] * request.num_prompt_tokens


def _samples_need_history(step: LaunchedStep) -> bool:
    """Whether a request sampled in ``step`` samples next from its token history read on the host
    (a grammar, a bad word of several tokens), which must then hold that step's token first.
    Penalties count the drawn tokens where they are drawn and min_tokens counts positions, so
    they need no such wait."""
    return any(reads_history_on_host(r) for r in step.requests)
