"""AsyncLLM: the engine on its own thread, with an asyncio API for servers.

The engine thread owns the LLMEngine. Callers validate and tokenize on their side (read-only
work), then hand requests over through a thread-safe command queue; each step's outputs are
delivered to per-request asyncio queues with one `call_soon_threadsafe` per step. When there is
nothing to run the thread blocks on the command queue, so an idle server does not spin.

A consumer that falls behind the engine (a busy event loop, a slow client) gets the outputs that
piled up in its queue merged into one, so the work per token shrinks as the token rate grows
instead of the backlog growing: the multi-token chunks of a server under load.

Admission is bounded (`QueueLimits`: refused at once with EngineOverloadedError), and a request may
carry a deadline: the engine thread checks deadlines before every step, so an expired request is
aborted, wherever it is, before the next step starts and its blocks are free by then.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import logging
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferd.config import EngineConfig
from inferd.engine.admission import DEFAULT_STEP_TIMEOUT_S, AdmissionQueue, QueueLimits
from inferd.engine.builder import build_engine_config
from inferd.engine.core import EngineStats
from inferd.engine.llm_engine import LLMEngine, Prompt
from inferd.engine.outputs import RequestMetrics, RequestOutput, merge_outputs
from inferd.engine.process_engine import EngineProcessDied, ProcessLLMEngine
from inferd.engine.request import FinishReason
from inferd.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    deadline: float | None  # time.monotonic() after which the request is aborted with TIMEOUT


@dataclass(frozen=True)
class _Abort:
    request_ids: list[str]
    reason: FinishReason
    error: str | None = None  # set: the requests end with this error rather than quietly


@dataclass(frozen=True)
class _Call:
    """Run ``call(engine)`` on the engine thread between steps; its result or error goes to ``done``."""

    call: Callable[[LLMEngine | ProcessLLMEngine], Any]
    done: concurrent.futures.Future[Any]


_STOP = object()
# Steps that fail one after another before the engine counts as dead (a fault that stays).
MAX_FAILED_STEPS_IN_A_ROW = 3
# How often an idle engine thread checks that its engine lives, so that an engine process lost
# between requests turns /health to 503 at once instead of failing the next request.
_IDLE_CHECK_S = 0.5


class AsyncLLM:
    """``engine`` is an LLMEngine (core in this thread) or a ProcessLLMEngine (core in a child
    process, used on GPUs so that detokenization never delays a kernel launch)."""

    def __init__(
        self,
        engine: LLMEngine | ProcessLLMEngine,
        queue_limits: QueueLimits | None = None,
        step_timeout_s: float | None = None,
    ) -> None:
        """``step_timeout_s``: an engine thread's step that runs longer makes the engine dead (see
        ``_watch_steps``; a ProcessLLMEngine watches its core itself). None: never."""
        self.engine = engine
        self.admission = AdmissionQueue(queue_limits)
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.config: EngineConfig = engine.config
        self.eos_token_ids = engine.eos_token_ids
        self._commands: queue.Queue[Any] = queue.Queue()
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._loops: dict[str, asyncio.AbstractEventLoop] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.dead_reason: str | None = None
        self._step_timeout_s = step_timeout_s
        self._step_started: float | None = None  # time.monotonic() while the engine thread steps
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.num_steps = 0
        self._failed_steps = 0  # in a row
        # Set (under the lock) when the engine loop ends: no call is queued after that.
        self._calls_refused = False
        # Engine thread only: (deadline, request id), soonest first; ids already finished are skipped.
        self._deadlines: list[tuple[float, str]] = []

    @classmethod
    def from_options(
        cls,
        model_path: str | Path | None = None,
        engine_process: bool | None = None,
        queue_limits: QueueLimits | None = None,
        step_timeout_s: float | None = DEFAULT_STEP_TIMEOUT_S,
        **options: Any,
    ) -> AsyncLLM:
        """``engine_process=None`` puts the core in its own process on CUDA, in a thread otherwise."""
        config = build_engine_config(model_path, **options)
        if engine_process is None:
            engine_process = config.device.startswith("cuda")
        if engine_process:
            return cls(ProcessLLMEngine(config, step_timeout_s), queue_limits)
        return cls(LLMEngine(config), queue_limits, step_timeout_s)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inferd-engine", daemon=True)
            self._thread.start()
        if self._step_timeout_s is not None and self._watchdog is None:
            self._watchdog = threading.Thread(
                target=self._watch_steps,
                args=(self._step_timeout_s,),
                name="inferd-step-watchdog",
                daemon=True,
            )
            self._watchdog.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout)
            self._watchdog = None
        stopped = True
        if self._thread is not None:
            self._commands.put(_STOP)
            self._thread.join(timeout)
            stopped = not self._thread.is_alive()
            self._thread = None
        if isinstance(self.engine, ProcessLLMEngine):
            self.engine.close()
        elif stopped:  # never under a step still running on the engine thread
            self.engine.shutdown()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_reason is None

    # -- requests -----------------------------------------------------------------------------
    def prepare(
        self, prompt: Prompt, params: SamplingParams, add_special_tokens: bool = True
    ) -> tuple[list[int], int]:
        """Tokenize and check a prompt (raises PromptError); returns its ids and the output budget.
        ``add_special_tokens`` false: a text gets none of its tokenizer's (no BOS)."""
        self.engine.inputs.check_task(params)
        token_ids = self.engine.inputs.tokenize_prompt(prompt, add_special_tokens)
        return token_ids, self.engine.inputs.resolve_max_tokens(len(token_ids), params)

    def resolve_bad_words(self, params: SamplingParams) -> SamplingParams:
        """``params`` with its bad words tokenized (``InputProcessor.resolve_bad_words``), here
        rather than on the engine thread."""
        return self.engine.inputs.resolve_bad_words(params)

    async def generate(
        self,
        request_id: str,
        prompt: Prompt | list[int],
        params: SamplingParams,
        deadline: float | None = None,
        admit: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Yields outputs as the request advances; the last one has ``finished=True``.

        Raises EngineOverloadedError when the queue is full (``admit`` False: the next part of
        work already admitted, such as a beam search's later steps, is never refused). Past ``deadline`` (a
        ``time.monotonic()`` value) the request ends with finish reason ``timeout``.
        Leaving the iteration early (client gone, task cancelled) aborts the request, which frees
        its KV blocks on the engine's next loop turn.
        """
        if not self.is_alive:
            raise EngineDeadError(self.dead_reason or "engine is not running")
        token_ids, _ = self.prepare(prompt, params)
        if admit:
            self.admission.admit(len(token_ids))
        queued = admit
        try:
            stream = self._register(request_id)
            self._commands.put(_Add(request_id, token_ids, params, time.monotonic(), deadline))
            finished = False
            held: RequestOutput | None = None
            try:
                while not finished:
                    if held is not None:
                        out, held = held, None
                    else:
                        out = await stream.get()
                    while not out.finished and not stream.empty():
                        following = stream.get_nowait()
                        if following.finished and not _ends_normally(following):
                            # An error or a timeout is raised by the protocol adapters: the tokens
                            # before it go out on their own first.
                            held = following
                            break
                        out = merge_outputs(out, following)
                    if queued:
                        self.admission.leave(len(token_ids))
                        queued = False
                    finished = out.finished
                    yield out
            finally:
                if not finished:
                    self.abort(request_id)
                self._forget(request_id)
        finally:
            if queued:
                self.admission.leave(len(token_ids))

    def _register(self, request_id: str) -> asyncio.Queue[RequestOutput]:
        stream: asyncio.Queue[RequestOutput] = _OutputStream()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._loops[request_id] = asyncio.get_running_loop()
        # The loop may have died after the check above and failed only the streams it saw then.
        if self.dead_reason is not None:
            self._forget(request_id)
            raise EngineDeadError(self.dead_reason)
        return stream

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        self._commands.put(_Abort([request_id], reason))

    def abort_all(self, message: str) -> None:
        """End every live request with `message` as its error (e.g. at the end of a shutdown drain)."""
        with self._lock:
            live = list(self._streams)
        if live:
            self._commands.put(_Abort(live, FinishReason.ABORT, message))

    async def load_adapter(self, name: str, path: str) -> None:
        """Serve a LoRA adapter from the next step on (``core.LoraUpdateError`` if it cannot be)."""
        await self._on_engine_thread(lambda engine: engine.load_adapter(name, path))

    async def unload_adapter(self, name: str) -> None:
        """Stop serving a LoRA adapter no request uses (``core.LoraUpdateError`` if it cannot be)."""
        await self._on_engine_thread(lambda engine: engine.unload_adapter(name))

    async def reset_prefix_cache(self) -> None:
        """Forget every cached prefix from the next step on (vLLM's /reset_prefix_cache)."""
        await self._on_engine_thread(lambda engine: engine.reset_prefix_cache())

    @property
    def lora_names(self) -> tuple[str, ...]:
        """The LoRA adapters served now."""
        return self.engine.inputs.lora_names

    async def _on_engine_thread(self, call: Callable[[LLMEngine | ProcessLLMEngine], Any]) -> Any:
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:  # queued before the loop's end, or refused: never left unanswered
            if not self.is_alive or self._calls_refused:
                raise EngineDeadError(self.dead_reason or "the engine is not running")
            self._commands.put(_Call(call, done))
        return await asyncio.wrap_future(done)

    @property
    def num_live_requests(self) -> int:
        with self._lock:
            return len(self._streams)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    # -- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                block = not self.engine.has_unfinished()
                if block:
                    self._deadlines.clear()  # nothing is unfinished, so every entry is stale
                if not self._drain_commands(block):
                    return
                self._expire_deadlines()
                if self.engine.has_unfinished():
                    self._step()
        except BaseException as exc:  # the thread must never die silently
            self.dead_reason = f"engine loop died: {exc!r}"
            logger.error("%s\n%s", self.dead_reason, traceback.format_exc())
            self._fail_all(self.dead_reason)
        finally:
            with self._lock:
                self._calls_refused = True
            self._refuse_queued_calls()

    def _refuse_queued_calls(self) -> None:
        """Calls queued behind the loop's end would wait forever: they fail instead."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Call) and command.done.set_running_or_notify_cancel():
                command.done.set_exception(EngineDeadError(self.dead_reason or "the engine has stopped"))

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued commands; returns False on shutdown."""
        outputs: list[RequestOutput] = []
        while True:
            try:
                command = self._commands.get(block=block, timeout=_IDLE_CHECK_S if block else None)
            except queue.Empty:
                if block:  # idle: an engine process that died now fails the loop, not a later request
                    self.engine.check_alive()
                break
            block = False
            if command is _STOP:
                self._fail_all("server is shutting down")
                return False
            if isinstance(command, _Add):
                outputs.extend(self._add(command))
            elif isinstance(command, _Abort):
                aborted = self.engine.abort(command.request_ids, command.reason)
                for out in aborted:
                    out.error = command.error
                outputs.extend(aborted)
            elif isinstance(command, _Call):
                self._call(command)
        self._deliver(outputs)
        return True

    def _call(self, command: _Call) -> None:
        """Run a queued call, unless its caller has given up on it (cancelled, timed out)."""
        if not command.done.set_running_or_notify_cancel():
            return
        try:
            result = command.call(self.engine)
        except EngineProcessDied:
            command.done.set_exception(EngineDeadError("the engine process died"))
            raise
        except Exception as exc:  # the caller's to handle; the engine goes on
            command.done.set_exception(exc)
        else:
            command.done.set_result(result)

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        expired = []
        while self._deadlines and self._deadlines[0][0] <= now:
            expired.append(heapq.heappop(self._deadlines)[1])
        if expired:
            # Ids that already finished are ignored by abort; the others end here, blocks freed.
            self._deliver(self.engine.abort(expired, FinishReason.TIMEOUT))

    def _add(self, command: _Add) -> list[RequestOutput]:
        try:
            self.engine.add_request(
                command.request_id, command.prompt_token_ids, command.params, command.arrival_time
            )
        except ValueError as exc:
            return [_error_output(command.request_id, command.prompt_token_ids, str(exc))]
        if command.deadline is not None:
            heapq.heappush(self._deadlines, (command.deadline, command.request_id))
            self._forget_finished_deadlines()
        return []

    def _forget_finished_deadlines(self) -> None:
        """Drops the entries of requests that finished before their deadline once they are most of
        the heap: under a long timeout an engine that is never idle (which clears it) would
        otherwise keep one per request it ever served. A rebuild runs once the heap holds twice the
        live requests and leaves at most half of it: amortized, a constant cost per request."""
        if len(self._deadlines) <= 2 * len(self._streams) + 64:
            return
        with self._lock:
            live = set(self._streams)
        self._deadlines = [entry for entry in self._deadlines if entry[1] in live]
        heapq.heapify(self._deadlines)

    def _step(self) -> None:
        self._step_started = time.monotonic()
        try:
            outputs = self.engine.step()
        except EngineProcessDied:
            raise  # nothing left to serve with: the loop ends and every waiter is told
        except Exception as exc:
            # A failing step cannot be attributed to one request: fail the batch, keep serving;
            # but a fault that stays (a broken device) fails every batch, and then the engine is
            # dead: the loop ends, /health says so and the server exits for a supervisor to restart.
            self._failed_steps += 1
            if self._failed_steps >= MAX_FAILED_STEPS_IN_A_ROW:
                raise RuntimeError(
                    f"{self._failed_steps} engine steps in a row failed; the last: {exc!r}"
                ) from exc
            logger.error("engine step failed: %r\n%s", exc, traceback.format_exc())
            live = list(self._streams)
            outputs = self.engine.abort(live, FinishReason.ERROR)
            for out in outputs:
                out.error = f"engine step failed: {exc}"
        else:
            if outputs:  # a step that moved requests on (not the engine process's idle report)
                self._failed_steps = 0
        finally:
            self._step_started = None
        self.num_steps += 1
        self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]
        ] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    by_loop.setdefault(self._loops[out.request_id], []).append((stream, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:
                pass  # that event loop is closed; its requests are gone with it

    def _watch_steps(self, timeout_s: float) -> None:
        """Watches the engine thread's steps from a thread of its own: one that runs past
        ``timeout_s`` has hung, and nothing will end it, so the engine counts as dead (/health
        503, the server stops with exit code 1 for a supervisor to restart it). The engine
        thread cannot be stopped: its requests are failed from here, and its calls refused."""
        while not self._stopping.wait(min(1.0, timeout_s / 4)):
            started = self._step_started
            if started is None or self.dead_reason is not None:
                continue
            running_s = time.monotonic() - started
            if running_s <= timeout_s:
                continue
            self.dead_reason = (
                f"engine hung: one step has run for {running_s:.0f} s "
                f"(the engine step timeout is {timeout_s:g} s)"
            )
            logger.error("%s", self.dead_reason)
            with self._lock:
                self._calls_refused = True
                live = list(self._streams)
            self._refuse_queued_calls()
            self._deliver([_error_output(request_id, [], self.dead_reason) for request_id in live])
            return

    def _fail_all(self, message: str) -> None:
        with self._lock:
            ids = list(self._streams)
        outputs = []
        for request_id in ids:
            # With the tokens made so far, so the request log and token counters stay true.
            out = self.engine.output_processor.finish(request_id, FinishReason.ERROR.value, message)
            outputs.append(out if out is not None else _error_output(request_id, [], message))
        self._deliver(outputs)

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self._loops.pop(request_id, None)


def _ends_normally(out: RequestOutput) -> bool:
    return out.error is None and out.finish_reason in (FinishReason.STOP.value, FinishReason.LENGTH.value)


class _OutputStream(asyncio.Queue[RequestOutput]):
    """A request's outputs, waiting for its reader. An output that comes while the last one is
    still unread joins it (``merge_outputs``), as the reader would join them: each output holds the
    request's whole history so far, so a reader that stops reading (a client that no longer reads
    its stream) would otherwise keep one copy of it per step, memory growing with the square of
    the output's length. An output that ends it abnormally stays apart, for the reader to raise
    after the tokens before it."""

    def _put(self, item: RequestOutput) -> None:
        waiting = self._queue  # type: ignore[attr-defined]  # asyncio.Queue's storage, for subclasses
        if waiting and not waiting[-1].finished and (not item.finished or _ends_normally(item)):
            waiting[-1] = merge_outputs(waiting[-1], item)
        else:
            waiting.append(item)


def _put_all(items: list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]) -> None:
    for stream, out in items:
        stream.put_nowait(out)


def _error_output(request_id: str, prompt_token_ids: list[int], message: str) -> RequestOutput:
    return RequestOutput(
        request_id=request_id,
        prompt_token_ids=prompt_token_ids,
        text="",
        token_ids=[],
        new_text="",
        new_token_ids=[],
        finished=True,
        finish_reason=FinishReason.ERROR.value,
        metrics=RequestMetrics(arrival_time=time.monotonic(), finished_time=time.monotonic()),
        error=message,
    )
