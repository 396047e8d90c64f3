"""Records, for each step the engine launches, whether it was launched while the step before it
was still unread (asynchronous scheduling running ahead), then launches it."""

from __future__ import annotations

import pytest

from inferd.sched.output import SchedulerOutput
from inferd.worker.model_runner import LaunchedStep, ModelRunner


def record_launches_over_unread(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    launched_over_unread: list[bool] = []
    launch = ModelRunner.launch

    def recorded(
        self: ModelRunner, out: SchedulerOutput, previous: LaunchedStep | None = None
    ) -> LaunchedStep:
        launched_over_unread.append(previous is not None)
        return launch(self, out, previous)

    monkeypatch.setattr(ModelRunner, "launch", recorded)
    return launched_over_unread
