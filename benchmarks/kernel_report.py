"""Every Triton kernel compiled for a Hopper GPU (sm_90a) on a machine without one, with what
the compiler made of it: registers, spills, shared memory, how many programs fit on one SM, and
whether the attention loops load their K/V tiles asynchronously (software-pipelined).

Compilation goes down to a cubin with the ptxas in Triton's wheel, run with Triton's own flags.
Arguments are specialized as Triton's launcher specializes them at run time, here for the
Qwen3-0.6B shape in the nano-vllm workload (256 decode rows, 2,048-token contexts, blocks of 16):
pointers 16-byte aligned, integers that are multiples of 16 marked so, integers equal to 1 made
constants. Without that the compiler cannot prove vector-wide accesses and emits neither vector
loads nor the asynchronous copies a GPU run gets.

    python benchmarks/kernel_report.py            # the table
    python benchmarks/kernel_report.py --check    # also exit 1 on spills, unpipelined attention
                                                  # loops or shared memory past the SM's limit
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Compile, never interpret, and keep the compiler's current floating-point fusion default.
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from gpu import DECODE_TILES  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
# sm_90 per SM (and the largest block): 64K registers, 64 warps, 32 blocks, 228 KB of shared
# memory of which one block may use 227 KB; the runtime reserves 1 KB per block.
SM_REGISTERS, SM_WARPS, SM_BLOCKS = 65536, 64, 32
SM_SHARED, BLOCK_SHARED_MAX, SHARED_RESERVED_PER_BLOCK = 228 * 1024, 227 * 1024, 1024
# Registers are granted per warp in units of 256.
REGISTER_UNIT = 256

BF16, FP32, I32, I64 = "*bf16", "*fp32", "*i32", "*i64"
CACHES = {"k_cache_ptr": BF16, "v_cache_ptr": BF16}
STEP = {"block_tables_ptr": I64, "seq_lens_ptr": I64, "query_start_loc_ptr": I64}
ROTARY = {
    "q_ptr": BF16, "k_ptr": BF16, "v_ptr": BF16, "q_out_ptr": BF16, "k_out_ptr": BF16, "v_cache_ptr": BF16,
    "slot_mapping_ptr": I64, "positions_ptr": I64, "cos_ptr": FP32, "sin_ptr": FP32,
    "q_norm_weight_ptr": BF16, "k_norm_weight_ptr": BF16, "eps": "fp32",
}  # fmt: skip
ROTARY_TILES = {"HEADS_P2": 16, "KV_HEADS_P2": 8, "HALF_P2": 64, "STORE_KV": False, "BLOCK_SIZE": 1}
STORE_KV = {"STORE_KV": True, "BLOCK_SIZE": 16}


# Qwen3-0.6B: 16 query and 8 KV heads of 128, hidden 1024, MLP 3072. q, k and v are views of the
# fused qkv output (rows of 32 heads); the rotary kernel's q output is contiguous (16 heads).
_QKV_ROW, _Q_ROW, _KV_ROW, _HEAD = 32 * 128, 16 * 128, 8 * 128, 128
_CACHE = {"stride_kc_block": 16 * _KV_ROW, "stride_kc_tok": _KV_ROW, "stride_kc_head": _HEAD,
          "stride_vc_block": 16 * _KV_ROW, "stride_vc_tok": _KV_ROW, "stride_vc_head": _HEAD}  # fmt: skip
_BLOCKS_PER_SEQ = 2048 // 16
_DECODE_INTS = {
    "stride_q_tok": _Q_ROW, "stride_q_head": _HEAD, **_CACHE, "stride_bt_seq": _BLOCKS_PER_SEQ,
    # 256 sequences fill the SMs unsplit: the output is written in place (split stride 0).
    "stride_o_row": _Q_ROW, "stride_o_head": _HEAD, "stride_o_split": 0, "stride_lse_seq": 16,
    "stride_lse_head": 1, "head_dim": 128, "group_size": 2, "num_splits": 1,
    # Every layer of the model sees its whole context (no sliding window).
    "window": 0,
}  # fmt: skip
_EXTEND_INTS = {
    "stride_q_tok": _Q_ROW, "stride_q_head": _HEAD, **_CACHE, "stride_bt_seq": _BLOCKS_PER_SEQ,
    "stride_o_tok": _Q_ROW, "stride_o_head": _HEAD, "head_dim": 128, "group_size": 2, "window": 0,
}  # fmt: skip
_ROTARY_INTS = {
    "stride_q_tok": _QKV_ROW, "stride_q_head": _HEAD, "stride_k_tok": _QKV_ROW, "stride_k_head": _HEAD,
    "stride_v_tok": _QKV_ROW, "stride_v_head": _HEAD, "stride_qo_tok": _Q_ROW, "stride_qo_head": _HEAD,
    "stride_cos_pos": 64, "stride_sin_pos": 64, "num_heads": 16, "num_kv_heads": 8, "half_dim": 64,
}  # fmt: skip
# Without the KV store, k goes to a contiguous tensor; with it, to the cache's slots.
_ROTARY_PLAIN = {**_ROTARY_INTS, "stride_ko_tok": _KV_ROW, "stride_ko_head": _HEAD, "stride_cache_block": 0,
                 "stride_cache_head": _HEAD}  # fmt: skip
_ROTARY_STORE = {**_ROTARY_INTS, "stride_ko_tok": _KV_ROW, "stride_ko_head": _HEAD,
                 "stride_cache_block": 16 * _KV_ROW, "stride_cache_head": _HEAD}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One kernel as the engine launches it: argument types (others are i32), run-time values of
    its integer arguments, constexprs, launch options, and whether its main loop must be
    pipelined."""

    module: str
    kernel: str
    label: str
    types: dict[str, str]
    ints: dict[str, int]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    pipelined_loop: bool = False
    # Launched with programmatic dependent launch (layers/triton_pdl.py).
    pdl: bool = False


ATTENTION = "inferd.attention.triton_kernels"
OPS = "inferd.layers.triton_ops"
LINEAR = "inferd.layers.triton_linear"
TILED = "inferd.layers.triton_tiled_linear"
SAMPLING = "inferd.sample.triton_sampling"
INVERSE_CDF = "inferd.sample.triton_inverse_cdf"
# Integer arguments whose value changes from call to call. Triton specializes an integer on its
# value (equal to 1, a multiple of 16, neither), so each new class would compile the kernel again
# in the middle of serving: these must be marked do_not_specialize.
PER_CALL_ARGUMENTS = [
    (SAMPLING, "_race_chunk_kernel", "seed"),
    (SAMPLING, "_race_chunk_kernel", "num_chunks"),
    (SAMPLING, "_pick_best_chunk_kernel", "num_chunks"),
    (INVERSE_CDF, "_block_mass_kernel", "blocks_per_part"),
    (INVERSE_CDF, "_pick_kernel", "seed"),
]


def cases() -> list[Case]:
    from inferd.attention import triton_kernels

    decode = {"q_ptr": BF16, **CACHES, "out_ptr": FP32, "lse_ptr": FP32, **STEP, "scale_log2": "fp32",
              "softcap_log2": "fp32"}  # fmt: skip
    extend = {"q_ptr": BF16, **CACHES, "out_ptr": BF16, **STEP, "scale_log2": "fp32", "softcap_log2": "fp32"}
    extend_tile = {"BLOCK_SIZE": 16, "GROUP_P2": 2, "BLOCK_Q": triton_kernels._EXTEND_BLOCK_M // 2,
                   "HEAD_DIM_P2": 128, "BLOCK_N": triton_kernels._EXTEND_BLOCK_N}  # fmt: skip
    decode_tile = {"BLOCK_SIZE": 16, "GROUP_P2": 16, "HEAD_DIM_P2": 128, "NUM_KV_HEADS": 8,
                   "HEADS_FIRST": False}  # fmt: skip
    default_tile = (triton_kernels._DECODE_BLOCK_N, triton_kernels._DECODE_NUM_WARPS,
                    triton_kernels._DECODE_NUM_STAGES)  # fmt: skip
    decode_cases = [
        Case(ATTENTION, "_paged_decode_kernel", f"decode keys={block_n} warps={warps} stages={stages}"
             + (" (default)" if (block_n, warps, stages) == default_tile else ""),
             decode, _DECODE_INTS, {**decode_tile, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages,
             pipelined_loop=True)
        for block_n, warps, stages in DECODE_TILES
    ] + [
        Case(ATTENTION, "_paged_decode_kernel", "decode, default tile, heads first", decode, _DECODE_INTS,
             {**decode_tile, "BLOCK_N": default_tile[0], "HEADS_FIRST": True}, num_warps=default_tile[1],
             num_stages=default_tile[2], pipelined_loop=True),
        # Gemma 2's layers cap their attention scores.
        Case(ATTENTION, "_paged_decode_kernel", "decode, default tile, scores soft-capped", decode,
             _DECODE_INTS, {**decode_tile, "BLOCK_N": default_tile[0], "HEADS_FIRST": True, "SOFTCAP": True},
             num_warps=default_tile[1], num_stages=default_tile[2], pipelined_loop=True),
    ]  # fmt: skip
    from inferd.layers import triton_linear

    # Decode-step projections: Qwen3's gate|up (1024 -> 6144) at 1 to 8 rows, default tiles; then
    # at one and two rows the fused inputs, as the layers launch them: the add + norm before
    # gate|up, and SiLU-and-mul before the down projection (3072 -> 1024).
    linear_types = {"x_ptr": BF16, "w_ptr": BF16, "bias_ptr": BF16, "y_ptr": BF16, "residual_ptr": BF16,
                    "norm_weight_ptr": BF16, "residual_out_ptr": BF16, "scale_ptr": FP32, "zero_ptr": "*i8",
                    "eps": "fp32"}  # fmt: skip
    linear_inputs = {  # label: (out, in, GATED, NORMED)
        "": (6144, 1024, False, False), " + add + RMSNorm": (6144, 1024, False, True),
        " + SiLU-and-mul": (1024, 3072, True, False),
    }  # fmt: skip
    linear_cases = []
    for label, (out_features, in_features, gated, normed) in linear_inputs.items():
        for rows in (1, 2, 4, 8) if not label else (1, 2):
            if label:
                tile = triton_linear.default_fused_tile(rows, in_features)
            else:
                tile = triton_linear.default_tile(rows, in_features)
            linear_cases.append(
                Case(LINEAR, "_skinny_linear_kernel", f"skinny linear rows={rows}{label}", linear_types,
                     {"rows": rows, "out_features": out_features, "in_features": in_features,
                      "stride_x_row": in_features * (2 if gated else 1), "stride_w_row": in_features,
                      "stride_y_row": out_features, "stride_residual_row": in_features if normed else 0,
                      "stride_scale_row": 0, "stride_zero_row": 0},
                     {"HAS_BIAS": False, "GATED": gated, "NORMED": normed, "HAS_RESIDUAL": normed,
                      "ROWS_P2": rows, "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k, "EVEN_K": True,
                      "NUM_STAGES": tile.num_stages},
                     num_warps=tile.num_warps, num_stages=tile.num_stages, pipelined_loop=True)
            )  # fmt: skip
    # The same gate|up over 8-bit weights (layers/quantized.py) at one and two rows: e4m3 with one
    # scale per output row (applied to the sums) and in 128 x 128 blocks (each weight tile scaled as
    # loaded), and int8 (W4A16's and W8A16's values) in groups of 128 input columns.
    # W4A16's 4-bit integers packed eight to an int32 word, with and without zero points.
    scaled_weights = {  # label: (weight type, SCALED, SCALE_ROWS, SCALE_COLUMNS, scale row stride, more)
        " fp8, a scale per row": ("*fp8e4nv", 1, 1, 1, 1, {}),
        " fp8, 128 x 128 blocks": ("*fp8e4nv", 2, 128, 128, 1024 // 128, {}),
        " int8, groups of 128": ("*i8", 2, 1, 128, 1024 // 128, {}),
        " int4 packed, groups of 128": ("*i32", 2, 1, 128, 1024 // 128, {"PACKED": True}),
        " int4 packed, groups of 128, zero points": (
            "*i32", 2, 1, 128, 1024 // 128, {"PACKED": True, "HAS_ZERO": True}),
    }  # fmt: skip
    for label, (weight_type, scaled, scale_rows, scale_columns, scale_stride, more) in scaled_weights.items():
        for rows in (1, 2):
            tile = triton_linear.default_tile(rows, 1024)
            linear_cases.append(
                Case(LINEAR, "_skinny_linear_kernel", f"skinny linear rows={rows}{label}",
                     {**linear_types, "w_ptr": weight_type},
                     {"rows": rows, "out_features": 6144, "in_features": 1024, "stride_x_row": 1024,
                      "stride_w_row": 1024 // 8 if more.get("PACKED") else 1024, "stride_y_row": 6144,
                      "stride_residual_row": 0, "stride_scale_row": scale_stride,
                      "stride_zero_row": scale_stride},
                     {"HAS_BIAS": False, "GATED": False, "NORMED": False, "HAS_RESIDUAL": False,
                      "ROWS_P2": rows, "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k, "EVEN_K": True,
                      "NUM_STAGES": tile.num_stages, "SCALED": scaled, "SCALE_ROWS": scale_rows,
                      "SCALE_COLUMNS": scale_columns, **more},
                     num_warps=tile.num_warps, num_stages=tile.num_stages, pipelined_loop=True)
            )  # fmt: skip
    from inferd.layers import triton_tiled_linear

    # The tensor-core matmul on Qwen3's q|k|v (1024 -> 4096) at 16 and 64 rows, default tiles.
    tiled_cases = []
    for rows in (16, 64):
        tile = triton_tiled_linear.default_tile(rows)
        tiled_cases.append(
            Case(TILED, "_tiled_linear_kernel", f"tiled linear rows={rows}",
                 {"x_ptr": BF16, "w_ptr": BF16, "bias_ptr": BF16, "y_ptr": BF16},
                 {"rows": rows, "out_features": 4096, "in_features": 1024, "stride_x_row": 1024,
                  "stride_w_row": 1024, "stride_y_row": 4096},
                 {"HAS_BIAS": False, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n,
                  "BLOCK_K": tile.block_k, "EVEN_K": True, "NUM_STAGES": tile.num_stages,
                  "INPUT_PRECISION": "tf32"},
                 num_warps=tile.num_warps, num_stages=tile.num_stages, pipelined_loop=True)
        )  # fmt: skip
    return with_pdl_cases(with_fp8_cache_cases([
        Case(ATTENTION, "_store_kv_kernel", "KV store",
             {"k_ptr": BF16, "v_ptr": BF16, **CACHES, "slot_mapping_ptr": I64},
             {"stride_k_tok": _QKV_ROW, "stride_k_head": _HEAD, "stride_v_tok": _QKV_ROW,
              "stride_v_head": _HEAD, **_CACHE, "num_kv_heads": 8, "head_dim": 128},
             {"BLOCK_SIZE": 16, "HEADS_P2": 8, "HEAD_DIM_P2": 128}),
        *decode_cases,
        # Qwen3's decode step with the rotary, q/k norms and KV store in the attention kernel,
        # from the fused projection's q, k and v views.
        Case(ATTENTION, "_paged_decode_rotary_kernel", "decode + q/k norm + rotary + KV store",
             {"q_ptr": BF16, "k_ptr": BF16, "v_ptr": BF16, **CACHES, "out_ptr": FP32, "lse_ptr": FP32, **STEP,
              "positions_ptr": I64, "slot_mapping_ptr": I64, "cos_ptr": FP32, "sin_ptr": FP32,
              "q_norm_weight_ptr": BF16, "k_norm_weight_ptr": BF16, "scale_log2": "fp32", "eps": "fp32"},
             {**_DECODE_INTS, "stride_q_tok": _QKV_ROW, "stride_k_tok": _QKV_ROW, "stride_k_head": _HEAD,
              "stride_v_tok": _QKV_ROW, "stride_v_head": _HEAD, "stride_cos_pos": 64},
             {**decode_tile, "BLOCK_N": default_tile[0], "NORM": True}, num_warps=default_tile[1],
             num_stages=default_tile[2], pipelined_loop=True),
        # Splits are merged when few sequences leave SMs idle: one sequence split 16 ways.
        Case(ATTENTION, "_merge_splits_kernel", "merge splits",
             {"partial_ptr": FP32, "lse_ptr": FP32, "out_ptr": BF16, "query_start_loc_ptr": I64},
             {"stride_p_row": 16 * _Q_ROW, "stride_p_head": 16 * _HEAD, "stride_p_split": _HEAD,
              "stride_lse_seq": 256, "stride_lse_head": 16, "stride_o_row": _Q_ROW, "stride_o_head": _HEAD,
              "num_splits": 16, "head_dim": 128},
             {"SPLITS_P2": 16, "HEAD_DIM_P2": 128}),
        *(Case(ATTENTION, "_paged_extend_kernel", label, extend, _EXTEND_INTS,
               {**extend_tile, "SOFTCAP": cap}, pipelined_loop=True)
          for label, cap in (("extend (prefill)", False), ("extend, scores soft-capped", True))),
        Case(OPS, "_rms_norm_kernel", "RMSNorm", {"x_ptr": BF16, "weight_ptr": BF16, "out_ptr": BF16,
             "eps": "fp32"},
             {"stride_x_outer": 1024, "stride_x_inner": 1024, "inner_size": 1, "hidden": 1024},
             {"BLOCK": 1024}),
        Case(OPS, "_fused_add_rms_norm_kernel", "add + RMSNorm",
             {"x_ptr": BF16, "residual_ptr": BF16, "weight_ptr": BF16, "out_ptr": BF16,
              "residual_out_ptr": BF16, "eps": "fp32"},
             {"stride_x_row": 1024, "stride_r_row": 1024, "hidden": 1024}, {"BLOCK": 1024}),
        Case(OPS, "_rotary_kernel", "rotary", ROTARY, _ROTARY_PLAIN, {**ROTARY_TILES, "NORM": False}),
        Case(OPS, "_rotary_kernel", "q/k norm + rotary", ROTARY, _ROTARY_PLAIN,
             {**ROTARY_TILES, "NORM": True}),
        Case(OPS, "_rotary_kernel", "rotary + KV store", ROTARY, _ROTARY_STORE,
             {**ROTARY_TILES, **STORE_KV, "NORM": False}),
        Case(OPS, "_rotary_kernel", "q/k norm + rotary + KV store", ROTARY, _ROTARY_STORE,
             {**ROTARY_TILES, **STORE_KV, "NORM": True}),
        Case(OPS, "_silu_and_mul_kernel", "SiLU-and-mul", {"gate_up_ptr": BF16, "out_ptr": BF16},
             {"stride_in_row": 6144, "stride_out_row": 3072, "size": 3072}, {"BLOCK": 1024}),
        *linear_cases,
        *tiled_cases,
        # The fused sampler over Qwen3's vocabulary, 256 rows in 3 parts, on the model's bfloat16
        # logits (the engine's) and on float32 ones; the seed and the number of parts are run-time
        # i32s (not specialized).
        *[Case(SAMPLING, "_race_chunk_kernel", f"race sampler, one part of a row ({name})",
               {"logits_ptr": dtype, "inv_temperature_ptr": FP32, "keys_ptr": FP32, "ids_ptr": I32},
               {"seed": 12345, "vocab": 151936, "stride_row": 151936, "chunk": 51200, "num_chunks": 3},
               {"BLOCK": 1024, "NUM_STAGES": 3}, pipelined_loop=True)
          for name, dtype in (("bf16", BF16), ("fp32", FP32))],
        Case(SAMPLING, "_pick_best_chunk_kernel", "race sampler, best part of a row",
             {"keys_ptr": FP32, "ids_ptr": I32, "out_ptr": I64}, {"num_chunks": 3}, {"MAX_CHUNKS_P2": 256}),
        # The inverse-CDF sampler on the same rows: 149 blocks of 1,024 tokens a row, in 5 parts.
        *[Case(INVERSE_CDF, "_block_mass_kernel", f"inverse-CDF sampler, block masses ({name})",
               {"logits_ptr": dtype, "inv_temperature_ptr": FP32, "block_max_ptr": FP32,
                "block_mass_ptr": FP32},
               {"vocab": 151936, "stride_row": 151936, "blocks_per_row": 149, "blocks_per_part": 30},
               {"BLOCK": 1024, "NUM_STAGES": 3, "LOG2E": 1.4426950408889634}, pipelined_loop=True)
          for name, dtype in (("bf16", BF16), ("fp32", FP32))],
        Case(INVERSE_CDF, "_pick_kernel", "inverse-CDF sampler, the draw",
             {"logits_ptr": BF16, "inv_temperature_ptr": FP32, "block_max_ptr": FP32, "block_mass_ptr": FP32,
              "out_ptr": I64},
             {"seed": 12345, "vocab": 151936, "stride_row": 151936, "blocks_per_row": 149},
             {"MAX_BLOCKS_P2": 256, "BLOCK": 1024, "LOG2E": 1.4426950408889634}),
    ]))  # fmt: skip


# The kernels that store into or read from the KV cache (the decode kernel in its default tile),
# by label, and their cache arguments.
_KV_CACHE_ARGUMENTS = {
    "KV store": ("k_cache_ptr", "v_cache_ptr"),
    "decode (default)": ("k_cache_ptr", "v_cache_ptr"),
    "decode + q/k norm + rotary + KV store": ("k_cache_ptr", "v_cache_ptr"),
    "extend (prefill)": ("k_cache_ptr", "v_cache_ptr"),
    "q/k norm + rotary + KV store": ("k_out_ptr", "v_cache_ptr"),
}


def with_fp8_cache_cases(cases: list[Case]) -> list[Case]:
    """``cases``, then those of ``_KV_CACHE_ARGUMENTS`` once more over an 8-bit float KV cache
    (engine option ``kv_cache_dtype="fp8"``): its stores round in integer steps, its reads widen."""
    fp8 = []
    for case in cases:
        key = "decode (default)" if case.label.endswith(" (default)") else case.label
        if key in _KV_CACHE_ARGUMENTS:
            types = {**case.types, **dict.fromkeys(_KV_CACHE_ARGUMENTS[key], "*fp8e4nv")}
            fp8.append(dataclasses.replace(case, label=f"{case.label}, fp8 KV cache", types=types))
    return cases + fp8


def with_pdl_cases(cases: list[Case]) -> list[Case]:
    """``cases``, then each case of a kernel that can launch with programmatic dependent launch
    once more with it: what the engine's ``triton_pdl`` option compiles."""
    from inferd.layers import triton_pdl

    return cases + [pdl_case(case) for case in cases if f"{case.module}:{case.kernel}" in triton_pdl.KERNELS]


def pdl_case(case: Case) -> Case:
    """``case`` launched with PDL; the skinny matmul then prefetches its weight rows into L2 before
    its wait, as ``triton_linear._prefetch_options`` asks for a weight that fits (bfloat16 here)."""
    constexprs = dict(case.constexprs)
    if case.kernel == "_skinny_linear_kernel":
        lines = -(-case.ints["in_features"] * 2 // 128)
        constexprs.update(PREFETCH_LINES=triton.next_power_of_2(lines), LINE_ELEMENTS=64)
    return dataclasses.replace(case, label=f"{case.label} (PDL)", pdl=True, constexprs=constexprs)


@dataclass(frozen=True)
class KernelReport:
    label: str
    kernel: str
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    async_copies: int
    blocks_per_sm: int
    limited_by: str
    problems: tuple[str, ...]


def compile_case(case: Case) -> KernelReport:
    kernel = getattr(importlib.import_module(case.module), case.kernel)
    names = kernel.arg_names
    # Constexprs with a default (PDL's) keep it unless the case sets them; PDL comes from ``case.pdl``.
    defaults = {p.name: p.default for p in kernel.params if p.default is not inspect.Parameter.empty}
    given = {*case.types, *case.constexprs, *case.ints, *defaults}
    missing = [a for a in names if a not in given]
    if missing:
        raise ValueError(f"{case.label}: no run-time value for {missing}")
    # The launcher's specialization: integers equal to 1 become constants, and pointers and
    # integers that are multiples of 16 are marked divisible by 16.
    constexprs = {**defaults, **case.constexprs, **{a: 1 for a, value in case.ints.items() if value == 1}}
    if "PDL" in names:
        constexprs["PDL"] = case.pdl
    signature = {a: "constexpr" if a in constexprs else case.types.get(a, "i32") for a in names}
    divisible = [i for i, a in enumerate(names) if signature[a].startswith("*")
                 or (signature[a] == "i32" and case.ints[a] % 16 == 0)]  # fmt: skip
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs, attrs),
        target=HOPPER,
        options={"num_warps": case.num_warps, "num_stages": case.num_stages, "launch_pdl": case.pdl},
    )
    assert compiled.asm["cubin"], case.label
    registers, spill_bytes = _ptxas_usage(compiled.asm["ptx"])
    shared = int(compiled.metadata.shared)
    blocks, limit = blocks_per_sm(registers, shared, case.num_warps)
    async_copies = compiled.asm["ttgir"].count("async_copy_global_to_local")
    problems = []
    if spill_bytes:
        problems.append(f"spills {spill_bytes} bytes")
    if shared > BLOCK_SHARED_MAX:
        problems.append(f"needs {shared} bytes of shared memory, past the {BLOCK_SHARED_MAX} a block may use")
    if blocks == 0:
        problems.append(f"no program fits on an SM ({limit})")
    if case.pipelined_loop and not async_copies:
        problems.append("its K/V loads are not asynchronous: the loop is not pipelined")
    problems.extend(pdl_problems(compiled.asm["ptx"], case.pdl, constexprs.get("PREFETCH_LINES", 0) > 0))
    problems.extend(reordered_index_problems(compiled.asm["ttir"]))
    return KernelReport(case.label, case.kernel, case.num_warps, case.num_stages, registers, spill_bytes,
                        shared, async_copies, blocks, limit, tuple(problems))  # fmt: skip


# PTX instructions that may touch global memory: loads, stores and atomics in any state space but
# the kernel's parameters, shared, local and constant memory (generic addresses included), and
# asynchronous copies; predicated or not. L2 prefetches are not accesses.
_GLOBAL_ACCESS = re.compile(
    r"^\s*(?:@!?%p\d+\s+)?(?:(?:ld|ldu|st|atom|red)\.(?!(?:param|shared|local|const)\b)|cp\.async\b"
    r"|(?!prefetch\.)[a-z]\w*(?:\.\w+)*\.global\b)",
    re.MULTILINE,
)
# Where a program may leave the straight line before its wait: it could skip the wait, or finish
# without it, and the kernel after it would no longer be ordered after the one before.
_BRANCH_OR_EXIT = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:bra|brx|ret|exit|call)\b", re.MULTILINE)


_REORDERED_RESHAPE = re.compile(r"^\s*(%[\w#.]+) = tt\.reshape .*\ballow_reorder\b", re.MULTILINE)
_REDUCE_OPERANDS = re.compile(r'"tt\.reduce"\(([^)]*)\)')


def reordered_index_problems(ttir: str) -> list[str]:
    """A reduction that returns an index (an argmax: the values reduced together with a range) over
    a tensor the compiler flattened with ``allow_reorder``. Triton lets a reshape that only feeds
    reductions reorder its elements, and in Triton 3.6 and 3.9 it does so without checking for an
    index operand: the index then counts in the reordered order, while the tensors it is used
    with keep theirs. The interpreter keeps numpy's order, so only compiled code picks the wrong
    element."""
    reordered = set(_REORDERED_RESHAPE.findall(ttir))
    problems = []
    for operands in _REDUCE_OPERANDS.findall(ttir):
        names = [name.strip() for name in operands.split(",")]
        if len(names) > 1 and reordered.intersection(names):
            problems.append(f"an index reduction over a reordered reshape ({operands}): the index is off")
    return problems


def pdl_problems(ptx: str, pdl: bool, prefetch: bool = False) -> list[str]:
    """What breaks programmatic dependent launch's rule in a kernel's PTX: with PDL, it must let
    the next kernel launch and wait for the previous one before any access to global memory (L2
    prefetches aside, which ``prefetch`` asks for before the wait); without, it must do neither (a
    plain launch has nothing to wait for)."""
    wait = ptx.find("griddepcontrol.wait")
    launch = ptx.find("griddepcontrol.launch_dependents")
    if not pdl:
        return ["grid dependency control without PDL"] if wait >= 0 or launch >= 0 else []
    if wait < 0 or launch < 0:
        return ["launched with PDL but does not both wait and let the next kernel launch"]
    if prefetch and not 0 <= ptx.find("prefetch.global.L2") < wait:
        return ["asked to prefetch its weights but has no L2 prefetch before griddepcontrol.wait"]
    problems = []
    first_access = _GLOBAL_ACCESS.search(ptx)
    if first_access is not None and first_access.start() < wait:
        problems.append(f"global memory access before griddepcontrol.wait: {first_access.group(0).strip()}")
    branch = _BRANCH_OR_EXIT.search(ptx)
    if branch is not None and branch.start() < wait:
        problems.append(f"a branch or exit before griddepcontrol.wait: {branch.group(0).strip()}")
    return problems


def _ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) from ptxas -v on the PTX Triton generated."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    # The PTX ISA version Triton emits needs the newer of the two assemblers in its wheel.
    ptxas = next(p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists())
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        target = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE)
        arch = target.group(1) if target else "sm_90a"
        # Triton's own ptxas flags (besides -v), so the counts are those of the cubin it builds.
        flags = ["-lineinfo", "--regAllocOptLevel=2", "-v", f"--gpu-name={arch}"]
        command = [str(ptxas), *flags, str(source), "-o", str(Path(tmp) / "k.cubin")]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
    registers = re.search(r"Used (\d+) registers", result.stderr)
    spills = re.search(r"(\d+) bytes spill stores", result.stderr)
    if registers is None:
        raise RuntimeError(f"no register count in ptxas output:\n{result.stderr}")
    return int(registers.group(1)), int(spills.group(1)) if spills else 0


def blocks_per_sm(registers: int, shared: int, num_warps: int) -> tuple[int, str]:
    """Programs of one kernel resident on one SM at once, and what limits them. Registers are
    counted as CUDA's occupancy calculator does: per warp in units of 256, each warp within one of
    the SM's four quarters of the register file."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    warps_by_registers = (SM_REGISTERS // 4 // max(per_warp, 1)) * 4
    limits = {
        "registers": warps_by_registers // num_warps,
        "shared memory": SM_SHARED // (shared + SHARED_RESERVED_PER_BLOCK),
        "warps": SM_WARPS // num_warps,
        "blocks": SM_BLOCKS,
    }
    limit = min(limits, key=lambda name: limits[name])
    return limits[limit], limit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if any kernel has a problem")
    parser.add_argument("--json", type=Path, help="also write the reports here")
    args = parser.parse_args(argv)
    reports = []
    header = (f"{'kernel':<44} {'warps':>5} {'stages':>6} {'regs':>5} {'spill':>5} {'smem KB':>8} "
              f"{'async':>5} {'per SM':>6}")  # fmt: skip
    print(f"Triton {triton.__version__}, compiled for sm_90a\n{header}", flush=True)
    for case in cases():
        report = compile_case(case)
        reports.append(report)
        print(f"{report.label:<44} {report.num_warps:>5} {report.num_stages:>6} {report.registers:>5} "
              f"{report.spill_bytes:>5} {report.shared_bytes / 1024:>8.1f} {report.async_copies:>5} "
              f"{report.blocks_per_sm:>6}  ({report.limited_by})"
              + "".join(f"\n    PROBLEM: {p}" for p in report.problems), flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=2))
    failed = [r.label for r in reports if r.problems]
    print(f"{len(reports)} kernels compiled, {len(failed)} with problems", flush=True)
    specialized = per_call_arguments_specialized()
    for problem in specialized:
        print(f"PROBLEM: {problem}", flush=True)
    return 1 if args.check and (failed or specialized) else 0


def per_call_arguments_specialized() -> list[str]:
    """The ``PER_CALL_ARGUMENTS`` that their kernel still specializes on their value."""
    problems = []
    for module, kernel_name, argument in PER_CALL_ARGUMENTS:
        kernel = getattr(importlib.import_module(module), kernel_name)
        param = next(p for p in kernel.params if p.name == argument)
        if not param.do_not_specialize:
            problems.append(f"{kernel_name}: {argument} changes every call but is specialized on its value")
    return problems


if __name__ == "__main__":
    sys.exit(main())
