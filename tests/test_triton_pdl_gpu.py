"""On a CUDA device of compute capability 9.0 or later only: programmatic dependent launch
(``layers/triton_pdl.py``) through captured CUDA graphs against plain launches.

Skipped elsewhere; the interpreter checks of the kernels' wait order are in ``test_triton_pdl.py``.
A kernel that read its input before the previous kernel finished would show as a changed token or
logprob here.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs a CUDA device and compiled Triton kernels", allow_module_level=True)
if torch.cuda.get_device_capability() < (9, 0):
    pytest.skip("programmatic dependent launch needs compute capability 9.0+", allow_module_level=True)
pytest.importorskip("triton")

from inferd.attention import triton_kernels  # noqa: E402
from inferd.layers import triton_linear, triton_pdl  # noqa: E402
from inferd.llm import LLM  # noqa: E402
from inferd.sampling_params import SamplingParams  # noqa: E402

# Contexts of 4 to some 250 tokens: decode steps replay graphs of 1 to 8 sequences with their
# contexts split 1 to 8 ways; greedy rows and sampled rows with logprobs.
PROMPTS = [[(11 * i + n) % 97 + 3 for i in range(n)] for n in (3, 120, 17, 200, 1, 64, 33, 9)]
PARAMS = [
    SamplingParams(max_tokens=12 + 5 * i, temperature=0.7 * (i % 2), seed=i, logprobs=3, ignore_eos=True)
    for i in range(len(PROMPTS))
]


def launch_pdl_of_compiled(kernel: object) -> set[bool]:
    """``launch_pdl`` of each compiled specialization of a Triton kernel: any compiled kernel in
    its per-device caches, whose nesting differs between Triton versions."""
    found: set[bool] = set()

    def walk(node: object, depth: int) -> None:
        metadata = getattr(node, "metadata", None)
        if metadata is not None and hasattr(metadata, "launch_pdl"):
            found.add(bool(metadata.launch_pdl))
        elif depth > 0 and isinstance(node, (dict, tuple, list)):
            for child in node.values() if isinstance(node, dict) else node:
                walk(child, depth - 1)

    walk(getattr(kernel, "device_caches", {}), 3)
    return found


def test_pdl_gives_the_same_tokens_and_logprobs_on_cuda(tiny_model_factory, monkeypatch) -> None:
    """Launching the decode step's kernels early, each waiting for the one before it, changes when
    they run, not what they compute: bit-equal tokens and logprobs through CUDA graphs, with the
    matmuls making their inputs and decode attention split (32 context tokens a part, so this tiny
    model's contexts split and the merge kernel runs too)."""
    monkeypatch.setattr(triton_kernels, "_MIN_TOKENS_PER_SPLIT", 32)
    folder = tiny_model_factory("qwen3")
    options = dict(device="cuda", dtype="bfloat16", block_size=16, num_kv_blocks=256, max_num_seqs=8,
                   max_num_batched_tokens=128, triton_fused_linear=True)  # fmt: skip
    # What the skinny matmul's launches asked for: the constexpr alone only adds the wait.
    asked: list[dict[str, object]] = []
    original = triton_linear.launch_options

    def recorded() -> dict[str, object]:
        asked.append(original())
        return asked[-1]

    monkeypatch.setattr(triton_linear, "launch_options", recorded)
    runs, launches, compiled = [], [], []
    try:
        for pdl in (False, True):
            asked.clear()
            llm = LLM(folder, triton_pdl=pdl, **options)
            assert triton_pdl.enabled() is pdl and llm.engine.core.runner.graphs is not None
            outputs = llm.generate(PROMPTS, PARAMS)
            runs.append([(o.token_ids, [lp.top for lp in o.logprobs or []]) for o in outputs])
            launches.append({launch.get("launch_pdl", False) for launch in asked})
            compiled.append(launch_pdl_of_compiled(triton_linear._skinny_linear_kernel))
            del llm
    finally:
        triton_pdl.set_enabled(False)
    assert runs[1] == runs[0]
    assert launches == [{False}, {True}]
    # And Triton compiled them so (earlier tests in this process may have compiled either kind).
    assert False in compiled[0] and True in compiled[1]
