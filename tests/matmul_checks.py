"""What the Triton matmul tests share: float64 references, the dtypes they run and tolerances."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from triton_device import INTERPRETED  # before triton is imported: interpreted or compiled

from inferd import LLM, SamplingParams
from inferd.engine.request import Request
from inferd.sched.output import SchedulerOutput

# float32 sums in another order than float64's; half-precision outputs are rounded once.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# The interpreter has no bfloat16 arithmetic of its own; compiled runs check it too.
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` in float64."""
    out = x.double() @ weight.double().T
    return out + bias.double() if bias is not None else out


def check_matches_float64(
    matmul: Callable[..., torch.Tensor], rows: int, out_features: int, in_features: int, dtype: torch.dtype,
    device: torch.device, **options: object,
) -> None:  # fmt: skip
    """``matmul(x, weight, bias, **options)`` on random operands, without and with a bias, has the
    right shape and dtype and is within the dtype's tolerance of float64."""
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=generator).to(dtype=dtype, device=device)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    weight = weight.to(dtype=dtype, device=device)
    bias = torch.randn(out_features, generator=generator).to(dtype=dtype, device=device)
    for b in (None, bias):
        out = matmul(x, weight, b, **options)
        assert out.shape == (rows, out_features) and out.dtype == dtype
        assert relative_error(out, reference(x, weight, b)) < TOLERANCE[dtype]


def decode_after_prompts(folder: Path, lengths: list[int]) -> tuple[LLM, SchedulerOutput, torch.Tensor]:
    """An engine (torch attention, synchronous steps) that has run one prompt per length, its next
    step (one decode token per sequence) and that step's logits on the torch path. In float32 on a
    GPU too: a bfloat16 engine's default would round the torch path's norm outputs and the fused
    matmul's not, further apart than the callers' 1e-4 on the logits. The Triton ops are off by
    name, since a GPU engine has them on by default."""
    llm = LLM(folder, kv_cache_memory="4MiB", block_size=8, attention_backend="torch", async_scheduling=False,
              dtype="float32", triton_ops=False)  # fmt: skip
    core = llm.engine.core
    vocab = llm.engine.config.model.vocab_size
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for offset, length in enumerate(lengths):
        prompt = [(7 * i + offset) % vocab for i in range(length)]
        core.add_request(Request(f"r{offset}", prompt, params, frozenset(), 3))
    core.step()  # the prompts
    decode = core.scheduler.schedule()
    assert decode.num_batched_tokens == len(lengths)
    return llm, decode, core.runner.logits_for(decode)
