"""The one-shot commands and `with LLM(...)` shut their engine down: a tensor-parallel engine left
running keeps its ranks, its rendezvous folder and the process's one process group."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferd import LLM
from inferd.cli import main
from inferd.engine.llm_engine import LLMEngine


@pytest.fixture
def shutdowns(monkeypatch: pytest.MonkeyPatch) -> list[LLMEngine]:
    seen: list[LLMEngine] = []
    shutdown = LLMEngine.shutdown

    def recorded(self: LLMEngine) -> None:
        seen.append(self)
        shutdown(self)

    monkeypatch.setattr(LLMEngine, "shutdown", recorded)
    return seen


def test_the_generate_command_shuts_its_engine_down(tiny_llama: Path, shutdowns: list[LLMEngine]) -> None:
    assert main(["generate", "--model", str(tiny_llama), "hi", "--max-tokens", "2"]) == 0
    assert len(shutdowns) == 1


def test_the_offline_bench_shuts_its_engine_down(
    tiny_llama: Path, tmp_path: Path, shutdowns: list[LLMEngine]
) -> None:
    argv = [
        "bench",
        "offline",
        str(tiny_llama),
        "--num-prompts",
        "2",
        "--input-len",
        "8",
        "--output-len",
        "2",
    ]
    argv += ["--max-model-len", "64", "--output-prefix", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 0
    assert len(shutdowns) == 1


def test_an_llm_used_as_a_context_manager_shuts_down_at_its_end(
    tiny_llama: Path, shutdowns: list[LLMEngine]
) -> None:
    with LLM(tiny_llama, kv_cache_memory="4MiB") as llm:
        assert not shutdowns
    assert shutdowns == [llm.engine]
