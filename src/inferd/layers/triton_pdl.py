"""Programmatic dependent launch (PDL) for the Triton kernels of a decode step (Hopper and later).

At one sequence a Qwen3-0.6B decode step is some 250 kernels of a few microseconds each, replayed
from a CUDA graph. Between two of them the GPU lets the first grid drain before it starts to place
the second one's programs: the last H200 run had about 180 us of such gaps in a 1.13 ms token, some
0.7 us a kernel. With PDL a kernel is launched as soon as every program of the kernel before it has
started (each kernel here first issues ``griddepcontrol.launch_dependents``), and its programs then
wait in ``griddepcontrol.wait`` until that kernel has finished and its writes are visible. The
launch and the placing of programs then happen during the previous kernel's tail.

The rule every kernel that takes ``PDL`` keeps: every one of its programs runs
``wait_for_previous_kernel`` on a straight line from its start, and reads and writes no memory
before it, so not before the kernel before it is done. The one thing allowed earlier is an L2
prefetch (``prefetch_to_l2``) of data no kernel writes: the skinny matmul can ask for its weight
rows there, so they stream in while the previous kernel ends (``PREFETCH_MAX_BYTES``, 0 by
default: slower on an H200). Waiting for that one kernel covers all
earlier ones: it could not finish before its own programs' waits returned, or, launched without
PDL (any torch op), before the kernel before it finished. A kernel launched without PDL waits for
the previous one to finish, as it always does.

The switch is process-wide, like torch's TF32 switch: the engine sets it from its ``triton_pdl``
option when it enables its kernels, and a CUDA graph keeps what was set when it was captured.
Which kernels take it: the small ops, matmuls and attention a decode step runs (``KERNELS``), in
whatever step they run; the prefill attention kernel and the sampler, which sit between torch ops
or run long, do not.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton older than PDL support: the switch stays off
    gdc_launch_dependents = gdc_wait = None

# "module:kernel" of every kernel launched with ``launch_options()``.
KERNELS = (
    "inferd.layers.triton_ops:_rms_norm_kernel",
    "inferd.layers.triton_ops:_fused_add_rms_norm_kernel",
    "inferd.layers.triton_ops:_rotary_kernel",
    "inferd.layers.triton_ops:_silu_and_mul_kernel",
    "inferd.layers.triton_linear:_skinny_linear_kernel",
    "inferd.layers.triton_tiled_linear:_tiled_linear_kernel",
    "inferd.attention.triton_kernels:_paged_decode_kernel",
    "inferd.attention.triton_kernels:_paged_decode_rotary_kernel",
    "inferd.attention.triton_kernels:_merge_splits_kernel",
)

_enabled = False


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """A PDL kernel's wait, before any memory access: let the next kernel launch, then wait for
    the previous one to finish. Without ``PDL`` nothing is emitted (the interpreter has no grid
    dependencies)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def prefetch_to_l2(ptrs):
    """Ask L2 for the lines holding ``ptrs`` without waiting for them (``prefetch.global.L2``).

    For a PDL kernel's inputs that no kernel writes (weights), before its wait: the lines stream in
    while the previous kernel finishes, and the loads after the wait find them in L2. A prefetch
    never makes a load see stale data (L2 is where the GPU's writes meet), so it is safe for any
    valid global address; it is only worth it for data the previous kernel does not make.
    Compiled code only: the interpreter has no inline assembly, so only PDL kernels call it.
    """
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )


def unsupported_reason(device: torch.device) -> str | None:
    """Why the kernels on ``device`` cannot launch with PDL, or None if they can."""
    if gdc_wait is None:
        return f"Triton {triton.__version__} has no grid dependency control"
    if device.type != "cuda":
        return f"programmatic dependent launch needs a CUDA GPU, not {device.type}"
    if not torch.cuda.is_available():
        return "programmatic dependent launch needs a CUDA GPU, and none is available"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"programmatic dependent launch needs compute capability 9.0 or later, not {major}.{minor}"
    return None


def set_enabled(enabled: bool, device: torch.device | None = None) -> None:
    """Launch ``KERNELS`` with PDL from now on, or not; turning it on checks ``device``."""
    global _enabled
    if enabled:
        reason = unsupported_reason(device if device is not None else torch.device("cpu"))
        if reason is not None:
            raise ValueError(f"triton_pdl: {reason}")
    _enabled = enabled


def enabled() -> bool:
    return _enabled


def launch_options() -> dict[str, Any]:
    """Keyword arguments for a launch of one of ``KERNELS``: none while PDL is off, so the
    kernels compile and launch exactly as they do without this module."""
    return {"PDL": True, "launch_pdl": True} if _enabled else {}
