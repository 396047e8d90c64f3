"""The servers run on uvloop when it is installed (it is a dependency on Linux)."""

from __future__ import annotations

import asyncio

import pytest

from inferd.server import event_loop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_servers_run_on_uvloop() -> None:
    pytest.importorskip("uvloop")
    assert event_loop.run(_loop_module()).startswith("uvloop")


def test_without_uvloop_the_default_loop_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_loop, "loop_factory", lambda: None)
    assert event_loop.run(_loop_module()).startswith("asyncio")
