"""ProcessLLMEngine: LLMEngine's interface, with the core in a child process (see core_process)."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import uuid
from ctypes import c_double
from pathlib import Path

import msgspec
import zmq

from inferd.config import EngineConfig
from inferd.engine.core import EngineStats, LoraUpdateError
from inferd.engine.core_process import (
    AbortMsg,
    AddMsg,
    DoneMsg,
    FatalMsg,
    FromCore,
    LoraMsg,
    OutputsMsg,
    ReadyMsg,
    ResetPrefixCacheMsg,
    ShutdownMsg,
    StepFailedMsg,
    run_core_process,
)
from inferd.engine.input_processor import InputProcessor, Prompt
from inferd.engine.output_processor import OutputProcessor
from inferd.engine.outputs import RequestOutput
from inferd.engine.request import FinishReason
from inferd.engine.tokenizer import Tokenizer
from inferd.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_READY_TIMEOUT_S = 600.0
# While requests are in flight, step() waits this long for the core's next message, so queued
# adds and aborts are forwarded promptly even during a long step.
_POLL_MS = 2
# A send waits in steps this long for the core to take it, checking between them that it lives: a
# PUSH socket whose peer is gone blocks forever.
_SEND_POLL_MS = 100


class EngineProcessDied(RuntimeError):
    pass


class EngineStepFailed(RuntimeError):
    """A step of the core's failed; the core lives on, without the requests it held."""


class ProcessLLMEngine:
    """Same methods as LLMEngine (add_request, step, abort, has_unfinished, stats)."""

    def __init__(self, config: EngineConfig, step_timeout_s: float | None = None) -> None:
        """``step_timeout_s``: a core that shows no progress for longer (one step running that long,
        or a process stopped or deadlocked) is hung: ``check_alive`` kills it and raises
        EngineProcessDied. None: never."""
        self.tokenizer = Tokenizer(config.tokenizer_path)
        # Before the core starts: a folder whose files this fails on leaves no process behind.
        self.inputs = InputProcessor(config, self.tokenizer)
        self.eos_token_ids = self.inputs.eos_token_ids
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids)
        self._step_timeout_s = step_timeout_s
        self._context = zmq.Context()
        # ZMQ leaves its ipc socket files when the sockets close: close() removes the folder.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="inferd-"))
        tag = uuid.uuid4().hex[:8]
        input_addr = f"ipc://{self._socket_dir}/in-{tag}"
        output_addr = f"ipc://{self._socket_dir}/out-{tag}"
        self._to_core = self._context.socket(zmq.PUSH)
        self._to_core.bind(input_addr)
        self._from_core = self._context.socket(zmq.PULL)
        self._from_core.bind(output_addr)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(FromCore)
        # spawn, not fork: CUDA cannot be initialised again in a forked child.
        context = multiprocessing.get_context("spawn")
        # When the core last showed progress (its clock: time.monotonic()); it writes, we read.
        self._progress = context.RawValue(c_double, time.monotonic())
        self._process = context.Process(
            target=run_core_process,
            # This process's id, not the one the child would read at its start: a server killed
            # while the child starts would otherwise leave it adopted, waiting for it forever.
            args=(config, input_addr, output_addr, self._progress, os.getpid()),
            name="inferd-engine-core",
            daemon=True,
        )
        self._process.start()
        ready = self._wait_ready()
        # With the KV blocks the core sized, as the thread engine's config carries them.
        self.config = dataclasses.replace(
            config, cache=dataclasses.replace(config.cache, num_blocks=ready.num_blocks)
        )
        self.max_model_len = ready.max_model_len
        self.num_blocks = ready.num_blocks
        self._stats = ready.stats
        # True from any add/abort until the core reports itself idle, so the caller keeps
        # calling step() and the final stats (blocks freed) are read.
        self._core_busy = False
        # Step outputs that came while a LoRA update waited for its answer: step() takes them first.
        self._held: list[OutputsMsg | StepFailedMsg] = []

    def _wait_ready(self) -> ReadyMsg:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._from_core.poll(200):
                message = self._decoder.decode(self._from_core.recv())
                if isinstance(message, ReadyMsg):
                    return message
                if isinstance(message, FatalMsg):
                    self.close()
                    raise EngineProcessDied(message.message)
            if not self._process.is_alive():
                self.close()
                raise EngineProcessDied(
                    f"engine process exited with code {self._process.exitcode} while loading"
                )
        self.close()
        raise EngineProcessDied("engine process did not become ready in time")

    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams, arrival_time: float | None = None
    ) -> list[int]:
        if request_id in self.output_processor:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = self.inputs.make_request(request_id, prompt, params, arrival_time)
        message = AddMsg(
            request_id,
            request.prompt_token_ids,
            request.params,  # as the input processor completed them (bad words' token ids)
            sorted(request.eos_token_ids),
            request.max_output_tokens,
            request.arrival_time,
        )
        self._send(message)
        self.output_processor.add(request_id, request.prompt_token_ids, params, request.arrival_time)
        return request.prompt_token_ids

    def load_adapter(self, name: str, path: str) -> None:
        """Serve a LoRA adapter from now on (``core.LoraUpdateError`` if it cannot be)."""
        self._update_adapter(LoraMsg(name, path))
        self.inputs.lora_names = (*self.inputs.lora_names, name)

    def unload_adapter(self, name: str) -> None:
        """Stop serving a LoRA adapter no request uses (``core.LoraUpdateError`` if it cannot be)."""
        self._update_adapter(LoraMsg(name, None))
        self.inputs.lora_names = tuple(n for n in self.inputs.lora_names if n != name)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix in the core's process."""
        self._update_adapter(ResetPrefixCacheMsg())

    def _update_adapter(self, message: LoraMsg | ResetPrefixCacheMsg) -> None:
        """Send the command and wait for the core's answer, keeping the step outputs sent before it."""
        busy = self._core_busy
        self._send(message)
        self._core_busy = busy  # an update alone brings no step, so no idle report would end it
        while True:
            if not self._from_core.poll(_SEND_POLL_MS):
                self.check_alive()
                continue
            answer = self._decoder.decode(self._from_core.recv())
            if isinstance(answer, FatalMsg):
                raise EngineProcessDied(answer.message)
            if isinstance(answer, DoneMsg):
                self._stats = answer.stats
                if answer.error is not None:
                    raise LoraUpdateError(answer.error, answer.kind)
                return
            assert isinstance(answer, (OutputsMsg, StepFailedMsg))
            self._held.append(answer)

    def step(self) -> list[RequestOutput]:
        """Outputs of the core's latest step (empty if none arrived within the poll interval)."""
        if self._held:
            message: FromCore = self._held.pop(0)
        else:
            if not self._from_core.poll(_POLL_MS):
                self.check_alive()
                return []
            message = self._decoder.decode(self._from_core.recv())
        if isinstance(message, FatalMsg):
            raise EngineProcessDied(message.message)
        if isinstance(message, StepFailedMsg):
            self._stats = message.stats
            raise EngineStepFailed(message.message)
        assert isinstance(message, OutputsMsg)
        self._stats = message.stats
        if message.stats.num_running == message.stats.num_waiting == 0:
            self._core_busy = False
        processed = self.output_processor.process(message.outputs)
        if processed.stopped:
            self._send(AbortMsg(processed.stopped, FinishReason.STOP.value))
        if processed.failed:
            self._send(AbortMsg(processed.failed, FinishReason.ERROR.value))
        return processed.outputs

    def _send(self, message: AddMsg | AbortMsg | LoraMsg | ResetPrefixCacheMsg) -> None:
        self._core_busy = True
        while not self._to_core.poll(_SEND_POLL_MS, zmq.POLLOUT):
            self.check_alive()
        self._to_core.send(self._encoder.encode(message))

    def check_alive(self) -> None:
        """Raises EngineProcessDied if the core's process has exited (killed, crashed), or has hung
        (see ``step_timeout_s``): then it is killed, so that the server can stop and a supervisor
        start it again."""
        if not self._process.is_alive():
            raise EngineProcessDied(f"engine process exited with code {self._process.exitcode}")
        silent_s = time.monotonic() - self._progress.value
        if self._step_timeout_s is not None and silent_s > self._step_timeout_s:
            self._process.kill()
            raise EngineProcessDied(
                f"engine process hung: no progress for {silent_s:.0f} s (the engine step timeout is "
                f"{self._step_timeout_s:g} s); it was killed"
            )

    def abort(self, request_ids: list[str], reason: FinishReason = FinishReason.ABORT) -> list[RequestOutput]:
        self._send(AbortMsg(list(request_ids), reason.value))
        finished = [self.output_processor.finish(i, reason.value) for i in request_ids]
        return [out for out in finished if out is not None]

    def has_unfinished(self) -> bool:
        return len(self.output_processor) > 0 or self._core_busy

    def stats(self) -> EngineStats:
        return self._stats

    def close(self) -> None:
        # Sent only if the core can take it: a core on its way out may have closed its inbox.
        if self._process.is_alive() and self._to_core.poll(1000, zmq.POLLOUT):
            self._to_core.send(self._encoder.encode(ShutdownMsg()))
        if self._process.is_alive():
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()
        self._to_core.close(linger=0)
        self._from_core.close(linger=0)
        self._context.term()
        shutil.rmtree(self._socket_dir, ignore_errors=True)
