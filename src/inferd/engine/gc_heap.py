"""Keeps the objects a process builds at start-up out of the cyclic garbage collector's passes.

Modules, the model, the tokenizer and the server's routes are some 220,000 tracked objects that
live until the process ends, and every full collection walked them all: 70-180 ms, once every
45-85 steps of a 256-request batch (BENCHMARKS.md, "Garbage collection at start-up"). Frozen, they
are left out of every pass, and a full pass walks only what serving makes.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger(__name__)


def freeze_start_up_heap() -> int:
    """Collect once, then move every object alive now out of the collector's generations; returns
    how many are frozen. Only for a process that has built what it keeps until it ends (a server,
    an engine process): a frozen object in a reference cycle is never freed."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("garbage collector: %d start-up objects frozen", frozen)
    return frozen
