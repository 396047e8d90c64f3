"""Records each call of the fused sampler's kernel (``triton_sampling.race_sample``), then makes it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class RaceCall:
    rows: int
    dtype: torch.dtype  # of the logits the kernel read
    temperatures: list[float]


def record_race_calls(monkeypatch: pytest.MonkeyPatch) -> list[RaceCall]:
    """The list the calls are appended to while the test runs. Triton is imported here, not at
    the module's import, so a test module can choose the interpreter first."""
    from inferd.sample import triton_sampling

    calls: list[RaceCall] = []
    original = triton_sampling.race_sample

    def recorded(logits: torch.Tensor, temperatures: torch.Tensor, seed: int) -> torch.Tensor:
        calls.append(RaceCall(logits.shape[0], logits.dtype, temperatures.tolist()))
        return original(logits, temperatures, seed)

    monkeypatch.setattr(triton_sampling, "race_sample", recorded)
    return calls
