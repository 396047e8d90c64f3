"""Records each call of a fused sampler kernel (``triton_sampling.race_sample`` or
``triton_inverse_cdf.inverse_cdf_sample``), then makes it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

# A fused sampler's kernel: its module under inferd.sample and its entry point.
_KERNELS = {
    "race": ("triton_sampling", "race_sample"),
    "inverse_cdf": ("triton_inverse_cdf", "inverse_cdf_sample"),
}


@dataclass(frozen=True)
class RaceCall:
    rows: int
    dtype: torch.dtype  # of the logits the kernel read
    temperatures: list[float]


def record_race_calls(monkeypatch: pytest.MonkeyPatch, kernel: str = "race") -> list[RaceCall]:
    """The list the calls of ``kernel`` (the sampler's ``FUSED_KERNELS``) are appended to while the
    test runs. Triton is imported here, not at the module's import, so a test module can choose
    the interpreter first."""
    import importlib

    module_name, function = _KERNELS[kernel]
    module = importlib.import_module(f"inferd.sample.{module_name}")
    calls: list[RaceCall] = []
    original = getattr(module, function)

    def recorded(logits: torch.Tensor, temperatures: torch.Tensor, seed: int) -> torch.Tensor:
        calls.append(RaceCall(logits.shape[0], logits.dtype, temperatures.tolist()))
        return original(logits, temperatures, seed)

    monkeypatch.setattr(module, function, recorded)
    return calls
