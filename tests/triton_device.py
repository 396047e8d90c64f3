"""Where the Triton kernel tests run: through Triton's interpreter on the CPU (the default), or
compiled on a CUDA device when ``TRITON_INTERPRET=0``. Import this before anything that imports
triton: the interpreter switch is read when triton is first imported."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

INTERPRETED = os.environ["TRITON_INTERPRET"] == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("compiled Triton kernels need a CUDA device", allow_module_level=True)
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
