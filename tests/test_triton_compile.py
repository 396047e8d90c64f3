"""The Triton kernels compile for a Hopper GPU (sm_90), checked on a machine without one.

Compilation runs Triton's whole pipeline down to a cubin with the ptxas that ships in its wheel,
so shape, type and layout errors that the interpreter does not catch show up in CI. It runs in
a fresh process: once triton is imported with TRITON_INTERPRET=1 (the interpreter tests set it),
its own library functions are interpreter objects and nothing in that process can compile.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.slow

BF16 = "*bf16"
CACHE_POINTERS = {"k_cache_ptr": BF16, "v_cache_ptr": BF16}
# The engine passes int64 step tensors (worker/input_buffers.py).
STEP_POINTERS = {"block_tables_ptr": "*i64", "seq_lens_ptr": "*i64", "query_start_loc_ptr": "*i64"}
# kernel name -> (pointer and float argument types, constexpr values); other arguments are i32.
CASES: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "_store_kv_kernel": (
        {"k_ptr": BF16, "v_ptr": BF16, **CACHE_POINTERS, "slot_mapping_ptr": "*i64"},
        {"BLOCK_SIZE": 16, "HEADS_P2": 8, "HEAD_DIM_P2": 128},
    ),
    "_paged_decode_kernel": (
        {"q_ptr": BF16, **CACHE_POINTERS, "out_ptr": "*fp32", "lse_ptr": "*fp32", **STEP_POINTERS,
         "scale_log2": "fp32"},
        {"BLOCK_SIZE": 16, "GROUP_P2": 16, "HEAD_DIM_P2": 128, "BLOCK_N": 64},
    ),
    "_merge_splits_kernel": (
        {"partial_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": BF16, "query_start_loc_ptr": "*i64"},
        {"SPLITS_P2": 16, "HEAD_DIM_P2": 128},
    ),
    "_paged_extend_kernel": (
        {"q_ptr": BF16, **CACHE_POINTERS, "out_ptr": BF16, **STEP_POINTERS, "scale_log2": "fp32"},
        {"BLOCK_SIZE": 16, "GROUP_P2": 2, "BLOCK_Q": 32, "HEAD_DIM_P2": 128, "BLOCK_N": 64},
    ),
}  # fmt: skip
FP32 = "*fp32"
ROTARY_POINTERS = {
    "q_ptr": BF16, "k_ptr": BF16, "v_ptr": BF16, "q_out_ptr": BF16, "k_out_ptr": BF16, "v_cache_ptr": BF16,
    "slot_mapping_ptr": "*i64", "positions_ptr": "*i64", "cos_ptr": FP32, "sin_ptr": FP32,
    "q_norm_weight_ptr": BF16, "k_norm_weight_ptr": BF16, "eps": "fp32",
}  # fmt: skip
ROTARY_TILES = {"HEADS_P2": 16, "KV_HEADS_P2": 8, "HALF_P2": 64, "STORE_KV": False, "BLOCK_SIZE": 1}
STORE_KV = {"STORE_KV": True, "BLOCK_SIZE": 16}
OP_CASES: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "_rms_norm_kernel": ({"x_ptr": BF16, "weight_ptr": BF16, "out_ptr": BF16, "eps": "fp32"}, {"BLOCK": 128}),
    "_fused_add_rms_norm_kernel": (
        {"x_ptr": BF16, "residual_ptr": BF16, "weight_ptr": BF16, "out_ptr": BF16, "residual_out_ptr": BF16,
         "eps": "fp32"},
        {"BLOCK": 4096},
    ),
    # "kernel:variant" compiles one kernel under several constexpr settings.
    "_rotary_kernel:plain": (ROTARY_POINTERS, {**ROTARY_TILES, "NORM": False}),
    "_rotary_kernel:qk_norm": (ROTARY_POINTERS, {**ROTARY_TILES, "NORM": True}),
    "_rotary_kernel:store_kv": (ROTARY_POINTERS, {**ROTARY_TILES, **STORE_KV, "NORM": False}),
    "_rotary_kernel:qk_norm_store_kv": (ROTARY_POINTERS, {**ROTARY_TILES, **STORE_KV, "NORM": True}),
    "_silu_and_mul_kernel": ({"gate_up_ptr": BF16, "out_ptr": BF16}, {"BLOCK": 1024}),
}  # fmt: skip
MODULE_CASES = {"inferd.attention.triton_kernels": CASES, "inferd.layers.triton_ops": OP_CASES}


def compile_every_kernel() -> None:
    """Runs in the child process, with the interpreter off."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    hopper = GPUTarget("cuda", 90, 32)
    for module_name, cases in MODULE_CASES.items():
        module = importlib.import_module(module_name)
        for name, (types, constexprs) in cases.items():
            kernel = getattr(module, name.partition(":")[0])
            signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in kernel.arg_names}
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=hopper)
            assert compiled.asm["cubin"], name
            print(f"{name}: compiled for sm_90", flush=True)


def test_kernels_compile_for_hopper() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    child = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert child.returncode == 0, child.stdout + child.stderr[-6000:]
    assert child.stdout.count("compiled for sm_90") == len(CASES) + len(OP_CASES)


if __name__ == "__main__":
    compile_every_kernel()
