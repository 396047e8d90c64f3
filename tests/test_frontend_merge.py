"""The Frontend's interleaving of n>1 streams holds one item per stream, not a backlog."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from inferd.server.frontend import _merge


async def test_a_slow_reader_leaves_the_backlog_with_the_producers() -> None:
    produced = [0, 0]

    async def producer(index: int) -> AsyncGenerator[int, None]:
        for item in range(50):
            produced[index] += 1
            yield 100 * index + item

    merged = _merge([producer(0), producer(1)])  # type: ignore[list-item]
    first = await merged.__anext__()
    await asyncio.sleep(0.05)  # the reader is busy; the producers may run ahead
    # One item each in the hand-off and one more each waiting to go in: the rest stay unmade,
    # where AsyncLLM would merge them into multi-token outputs.
    assert sum(produced) <= 6
    rest = [item async for item in merged]
    assert sorted([first, *rest]) == [*range(50), *range(100, 150)]
