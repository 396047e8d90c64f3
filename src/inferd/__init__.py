"""inferd: an LLM and classic-model inference engine and server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from inferd.sampling_params import SamplingParams

if TYPE_CHECKING:
    from inferd.llm import LLM

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    # The engine pulls in torch; keep `import inferd` light for tools that only need the CLI.
    if name == "LLM":
        from inferd.llm import LLM

        return LLM
    raise AttributeError(name)
