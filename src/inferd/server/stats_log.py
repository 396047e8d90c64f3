"""The server's periodic engine line (`--log-stats-interval`, off with `--disable-log-stats`):
every interval in which the engine did something, the prompt and generation throughput, the
requests running and waiting, the KV cache's use and the prefix cache's hit rate, as vLLM logs them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from inferd.engine.core import EngineStats

logger = logging.getLogger("inferd.server")


def stats_line(before: EngineStats, now: EngineStats, seconds: float) -> str | None:
    """The line for the interval between two readings of the engine's stats; None when it was idle
    throughout (nothing computed, nothing running or waiting)."""
    prompt = now.prompt_tokens_computed - before.prompt_tokens_computed
    generated = now.generated_tokens - before.generated_tokens
    if not (prompt or generated or now.num_running or now.num_waiting):
        return None
    queries = now.prefix_queries - before.prefix_queries
    hits = now.prefix_hits - before.prefix_hits
    hit_rate = f"{100 * hits / queries:.1f}%" if queries else "-"
    return (
        f"engine: prompt {prompt / seconds:.1f} tok/s, generation {generated / seconds:.1f} tok/s, "
        f"running {now.num_running}, waiting {now.num_waiting}, KV cache {100 * now.kv_usage:.1f}%, "
        f"prefix cache hits {hit_rate}"
    )


async def log_engine_stats(read: Callable[[], EngineStats], interval_s: float) -> None:
    """Logs `stats_line` every `interval_s` seconds until cancelled; a reading that fails (an
    engine on its way down) is skipped, not the end of the lines."""
    before, then = read(), time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        try:
            now = read()
        except Exception as exc:
            logger.warning("engine stats unreadable: %r", exc)
            continue
        at = time.monotonic()
        line = stats_line(before, now, at - then)
        if line is not None:
            logger.info("%s", line)
        before, then = now, at
