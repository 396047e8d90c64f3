"""The Triton kernels compile for a Hopper GPU (sm_90a), checked on a machine without one.

`benchmarks/kernel_report.py --check` runs Triton's whole pipeline down to a cubin with the ptxas
in its wheel, with arguments specialized as the launcher specializes them on a GPU. So shape, type
and layout errors that the interpreter does not catch show up in CI, and so do register spills,
shared memory past a block's limit, attention loops whose K/V loads are no longer
asynchronous (pipelined), integer arguments that change every call (the sampler's seed)
but would be specialized on their value, recompiling the kernel while serving, and kernels
compiled for programmatic dependent launch that touch memory, branch or exit before their wait
(each such kernel is compiled both ways), and argmax-style reductions over a tile the compiler
may flatten in its own order (the index would not be the tensor's). It runs in a
fresh process: once triton is imported with TRITON_INTERPRET=1 (the interpreter tests set it),
nothing in that process can compile.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPORT = Path(__file__).parents[1] / "benchmarks" / "kernel_report.py"


def test_kernels_compile_for_hopper_without_spills_and_with_pipelined_attention() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    command = [sys.executable, str(REPORT), "--check"]
    child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert child.returncode == 0, child.stdout + child.stderr[-6000:]
    summary = re.search(r"(\d+) kernels compiled, 0 with problems", child.stdout)
    assert summary and int(summary.group(1)) >= 17, child.stdout
    # The default decode tile compiled with asynchronous K/V loads (the async column is not 0).
    default_decode = r"^decode keys=\d+ warps=\d+ stages=\d+ \(default\)(\s+\d+){3}\s+0\s+[\d.]+\s+[1-9]"
    assert re.search(default_decode, child.stdout, re.MULTILINE), child.stdout
