"""A stand-in for the server's Frontend that answers one choice with scripted text deltas, for
testing what the chat routes make of an answer without a model that writes it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from inferd.engine.outputs import RequestMetrics, RequestOutput
from inferd.server.frontend import IndexedOutput


def _output(text: str, new_text: str, finished: bool) -> RequestOutput:
    return RequestOutput(
        request_id="r-0", prompt_token_ids=[1], text=text, token_ids=[5] * len(text), new_text=new_text,
        new_token_ids=[5], finished=finished, finish_reason="stop" if finished else None,
        metrics=RequestMetrics(arrival_time=0.0),
    )  # fmt: skip


class ScriptedFrontend:
    """Answers every request with `deltas`, in order, the last one finishing it with `stop`."""

    tokenizer = None
    eos_token_ids = frozenset({0})

    def __init__(self, deltas: list[str]) -> None:
        self.deltas = deltas

    def generate(self, *_: Any, **__: Any) -> AsyncIterator[IndexedOutput]:
        async def outputs() -> AsyncIterator[IndexedOutput]:
            for i, delta in enumerate(self.deltas):
                done = i == len(self.deltas) - 1
                yield IndexedOutput(0, _output("".join(self.deltas[: i + 1]), delta, done))

        return outputs()
