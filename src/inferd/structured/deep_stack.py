"""Runs grammar compilation on a thread with a deep stack.

llguidance compiles a constraint by recursing over its rules: a chain of a few thousand rules or
JSON-schema references (a 65 KB request) overflowed the 8 MiB stack of a server's threads, and a
stack overflow in native code kills the whole process. Every compilation therefore runs on one
thread whose stack is ``STACK_BYTES`` (address space, touched only as deep as a compilation goes),
and a constraint's size is capped (``spec.MAX_CONSTRAINT_CHARS``) so that no constraint a client
may send recurses deeper than this stack holds.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

# Four times what the deepest constraints MAX_CONSTRAINT_CHARS admits need: chains of 2,782
# JSON-schema references or 11,373 Lark rules overflowed a 32 MiB stack and not a 64 MiB one.
STACK_BYTES = 256 * 1024 * 1024

_jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
_started = threading.Lock()
_worker: threading.Thread | None = None


def on_deep_stack(compile_: Callable[[], T]) -> T:
    """``compile_()``'s result (or its exception), computed on the deep-stack thread; the caller
    waits. Calls from that thread itself run at once (a compilation that compiles a part)."""
    if threading.current_thread() is _worker:
        return compile_()
    _start()
    done: Future[T] = Future()
    _jobs.put((compile_, done))
    return done.result()


def _start() -> None:
    global _worker
    with _started:
        if _worker is not None:
            return
        # The stack size applies to threads started while it is set: this one alone, here.
        previous = threading.stack_size(STACK_BYTES)
        try:
            _worker = threading.Thread(target=_serve, name="inferd-grammar-compiler", daemon=True)
            _worker.start()
        finally:
            threading.stack_size(previous)


def _serve() -> None:
    while True:
        compile_, done = _jobs.get()
        if not done.set_running_or_notify_cancel():
            continue
        try:
            done.set_result(compile_())
        except BaseException as exc:  # the caller's to handle, on its own thread
            done.set_exception(exc)
