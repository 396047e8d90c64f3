"""The engine core in its own process, driven over ZMQ with msgpack messages.

On a GPU, HTTP handling, JSON and detokenization run in the server process; this process only
schedules and launches the model, so nothing Python-heavy sits between two steps. Messages are
typed msgspec structs: compact to encode and checked when decoded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import traceback
from ctypes import c_double
from pathlib import Path
from types import FrameType

import msgspec
import zmq

from inferd.config import EngineConfig
from inferd.engine.builder import resolve_num_blocks
from inferd.engine.core import EngineCore, EngineStats, LoraUpdateError
from inferd.engine.gc_heap import freeze_start_up_heap
from inferd.engine.outputs import EngineCoreOutput
from inferd.engine.request import FinishReason, Request
from inferd.sampling_params import SamplingParams
from inferd.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# How often an idle engine process checks that the server process that started it still lives.
_PARENT_CHECK_MS = 1000


class AddMsg(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: list[int]
    max_output_tokens: int
    arrival_time: float


class AbortMsg(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]
    reason: str


class ShutdownMsg(msgspec.Struct, tag=True, array_like=True):
    pass


class LoraMsg(msgspec.Struct, tag=True, array_like=True):
    """Load (with ``path``) or unload (``path`` None) a LoRA adapter; answered by DoneMsg."""

    name: str
    path: str | None


class ResetPrefixCacheMsg(msgspec.Struct, tag=True, array_like=True):
    """Forget every cached prefix; answered by DoneMsg."""


class DoneMsg(msgspec.Struct, tag=True, array_like=True):
    """The answer to a command between steps (a LoRA update, a prefix-cache reset), with the
    core's stats after it (the adapters it serves may have changed)."""

    error: str | None  # None: done
    kind: str  # LoraUpdateError's kind when it failed
    stats: EngineStats


class ReadyMsg(msgspec.Struct, tag=True, array_like=True):
    num_blocks: int
    max_model_len: int
    stats: EngineStats  # the core's before any request


class OutputsMsg(msgspec.Struct, tag=True, array_like=True):
    outputs: list[EngineCoreOutput]
    stats: EngineStats


class FatalMsg(msgspec.Struct, tag=True, array_like=True):
    message: str


class StepFailedMsg(msgspec.Struct, tag=True, array_like=True):
    """A step failed (``message``: why) in a way no one request can be blamed for: the core aborted
    every request it held; the client fails all of its own, those the step may have finished too."""

    message: str
    stats: EngineStats


ToCore = AddMsg | AbortMsg | ShutdownMsg | LoraMsg | ResetPrefixCacheMsg
FromCore = ReadyMsg | OutputsMsg | FatalMsg | DoneMsg | StepFailedMsg


def run_core_process(
    config: EngineConfig,
    input_addr: str,
    output_addr: str,
    progress: c_double | None = None,
    parent: int | None = None,
) -> None:
    """Entry point of the engine process: load, report ready, then serve steps until shut down,
    or until the server process ``parent`` (this one's parent by default) is gone.

    ``progress``: shared with the client, which reads in it when this process last showed it was
    not stuck (between two steps, or each second while idle or waiting for the server to read):
    ``time.monotonic()``, the same clock in every process of the machine."""
    global _progress
    _progress = progress
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s engine[{os.getpid()}] %(message)s")
    # Ctrl-C in a terminal and a service manager's SIGTERM reach the whole process group, while
    # the server drains its requests and then sends ShutdownMsg: SIGINT is ignored, and SIGTERM
    # (also how multiprocessing ends a daemon child at exit) ends the core once it is idle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if parent is None:
        parent = os.getppid()
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = context.socket(zmq.PUSH)
    outbox.connect(output_addr)
    encoder = msgspec.msgpack.Encoder()
    runner: ModelRunner | None = None
    try:
        runner = ModelRunner(config)
        config = resolve_num_blocks(config)
        core = EngineCore(config, runner)
        assert config.cache.num_blocks is not None
        ready = ReadyMsg(config.cache.num_blocks, config.scheduler.max_model_len, core.stats())
        freeze_start_up_heap()
        _beat()  # loading took what it took: the client counts from here
        outbox.send(encoder.encode(ready))
        _serve(core, inbox, outbox, encoder, parent)
    except Exception as exc:
        logger.error("engine process failed: %r\n%s", exc, traceback.format_exc())
        outbox.send(encoder.encode(FatalMsg(f"engine process failed: {exc!r}")))
        raise SystemExit(1) from exc
    finally:
        if runner is not None:
            runner.shutdown()  # the other tensor-parallel ranks, if any
        inbox.close(linger=0)
        outbox.close(linger=1000)
        context.term()
        if os.getppid() != parent:  # a server killed (SIGKILL) cannot remove its sockets' folder
            _remove_ipc_sockets(input_addr, output_addr)


def _remove_ipc_sockets(*addresses: str) -> None:
    """The socket files of ``addresses`` (``ipc://`` paths the server bound), and each folder
    they leave empty (the server made one for them: `ProcessLLMEngine`)."""
    paths = [Path(address.removeprefix("ipc://")) for address in addresses if address.startswith("ipc://")]
    for path in paths:
        path.unlink(missing_ok=True)
    for folder in {path.parent for path in paths}:
        with contextlib.suppress(OSError):  # something else in it: not only the server's sockets
            folder.rmdir()


_terminating = threading.Event()
_progress: c_double | None = None


def _beat() -> None:
    """Tell the client this process is not stuck (see run_core_process)."""
    if _progress is not None:
        _progress.value = time.monotonic()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _terminating.set()


def _parent_gone(parent: int) -> bool:
    """The server process that started this one is gone (killed: no ShutdownMsg will come)."""
    if os.getppid() == parent:
        return False
    logger.warning("the server process is gone: the engine process ends")
    return True


def _send(outbox: zmq.Socket, data: bytes, parent: int) -> bool:
    """Sends unless the server process is gone (a PUSH socket without its peer blocks forever)."""
    while not outbox.poll(_PARENT_CHECK_MS, zmq.POLLOUT):
        _beat()  # the server is slow to read, not this process
        if _parent_gone(parent):
            return False
    outbox.send(data)
    return True


def _update_adapter(core: EngineCore, message: LoraMsg) -> DoneMsg:
    try:
        if message.path is None:
            core.unload_adapter(message.name)
        else:
            core.load_adapter(message.name, message.path)
    except LoraUpdateError as exc:
        return DoneMsg(str(exc), exc.kind, core.stats())
    except Exception as exc:  # the update's failure alone: the core serves on
        logger.error("LoRA update failed: %r\n%s", exc, traceback.format_exc())
        return DoneMsg(f"the LoRA update failed: {exc!r}", "failed", core.stats())
    return DoneMsg(None, "", core.stats())


def _serve(
    core: EngineCore, inbox: zmq.Socket, outbox: zmq.Socket, encoder: msgspec.msgpack.Encoder, parent: int
) -> None:
    decoder = msgspec.msgpack.Decoder(ToCore)
    while True:
        _beat()
        if not core.has_unfinished():
            # Idle: wait for work; end on SIGTERM or with a parent that is gone.
            while not inbox.poll(_PARENT_CHECK_MS):
                _beat()
                if _parent_gone(parent) or _terminating.is_set():
                    return
        elif _parent_gone(parent):  # orphaned mid-work: nobody reads what it would compute
            return
        # Take whatever arrived, then step again at once.
        flags = zmq.NOBLOCK
        aborted = False
        while True:
            try:
                message = decoder.decode(inbox.recv(flags))
            except zmq.Again:
                break
            flags = zmq.NOBLOCK
            if isinstance(message, ShutdownMsg):
                return
            if isinstance(message, AddMsg):
                request = Request(
                    request_id=message.request_id,
                    prompt_token_ids=message.prompt_token_ids,
                    params=message.params,
                    eos_token_ids=frozenset(message.eos_token_ids),
                    max_output_tokens=message.max_output_tokens,
                    arrival_time=message.arrival_time,
                )
                try:
                    core.add_request(request)
                except ValueError as exc:  # this request's alone: it ends with the error
                    refused = EngineCoreOutput(request.request_id, None, None, FinishReason.ERROR.value,
                                               error=str(exc))  # fmt: skip
                    if not _send(outbox, encoder.encode(OutputsMsg([refused], core.stats())), parent):
                        return
            elif isinstance(message, LoraMsg):
                if not _send(outbox, encoder.encode(_update_adapter(core, message)), parent):
                    return
            elif isinstance(message, ResetPrefixCacheMsg):
                core.reset_prefix_cache()
                if not _send(outbox, encoder.encode(DoneMsg(None, "", core.stats())), parent):
                    return
            else:
                core.abort(message.request_ids, FinishReason(message.reason))
                aborted = True
        if core.has_unfinished():
            try:
                outputs = core.step()
            except Exception as exc:
                # As on the engine thread (AsyncLLM._step, which the client's step raises into): a
                # failing step cannot be attributed to one request, so its requests fail.
                logger.error("engine step failed: %r\n%s", exc, traceback.format_exc())
                core.abort(list(core.scheduler.requests), FinishReason.ERROR)
                if not _send(outbox, encoder.encode(StepFailedMsg(str(exc), core.stats())), parent):
                    return
                continue
            if not _send(outbox, encoder.encode(OutputsMsg(outputs, core.stats())), parent):
                return
        elif aborted:
            # No step will follow to carry fresh stats: report the freed blocks now.
            if not _send(outbox, encoder.encode(OutputsMsg([], core.stats())), parent):
                return
