"""One-call GPU benchmark: Triton attention checked against PyTorch, then generation speed.

In one run, on random-weight models in real shapes built directly on the device:
  1. relative error of the Triton attention backend against the PyTorch one (kernels alone, and
     a whole model forward);
  2. the nano-vllm workload (256 sequences, prompt and output lengths uniform in [100, 1024],
     token ids up to 10000, ``random.seed(0)``, EOS ignored) on the Qwen3-0.6B shape, for inferd
     and, unless ``--skip-transformers``, for transformers' continuous batching;
  3. batch-1 decode of 256 tokens on the Qwen3-0.6B and Llama-3.1-8B shapes.
Every speed is also given as a fraction of its roofline floor (see ``roofline.py``), over ceilings
measured in the same run. Results go to ``--out`` as JSON.

    python benchmarks/gpu.py --out benchmarks/results/h200.json            # on a GPU
    python benchmarks/gpu.py --smoke --out /tmp/smoke.json                 # tiny shapes, CPU

``--smoke`` runs everything at toy sizes on the CPU (Triton through its interpreter) in a few
minutes, to check the script itself without a GPU.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import gc
import importlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# When this run started, before torch's import: the budget counts from here, in the process the
# command line started (its child process is told it with --started-at).
PROCESS_STARTED_AT = time.time()

if TYPE_CHECKING:
    from inferd.models.registry import CausalLM
    from inferd.worker.warm_up import WarmUpReport

# The smoke run interprets Triton on the CPU; the switch must be set before triton is imported.
if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from roofline import Ceilings, ModelShape, decode_floor_s, generation_floor_s, step_floor_s  # noqa: E402

# transformers' continuous batching on the nano-vllm workload, Qwen3-0.6B shape, lent H200
# (torch 2.11): the figure used when --skip-transformers, with where it came from.
TRANSFORMERS_H200_REFERENCE = {"output_tok_s": 624.0, "source": "H200 run recorded in DESIGN.md (torch 2.11)"}

QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
    "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
    "tie_word_embeddings": True,
}  # fmt: skip
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}  # fmt: skip
# A mixture of experts (128 experts, 8 a token): the torch experts against triton_moe, batch 1.
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
    "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "max_position_embeddings": 40960, "tie_word_embeddings": False, "num_experts": 128,
    "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
}  # fmt: skip
BATCH1_PROMPT_LEN = 16
# Toy sizes for --smoke: the same code paths, small enough for the CPU and the Triton interpreter.
SMOKE_SIZES = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
}  # fmt: skip
# --smoke's mixture of experts: few, narrow experts, so the interpreter runs the Triton path quickly.
SMOKE_MOE_SIZES = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}


@dataclass(frozen=True)
class Plan:
    """What one run does; --smoke shrinks every number."""

    device: str
    dtype: torch.dtype
    num_seqs: int
    max_prompt_len: int
    max_output_len: int
    decode_tokens: int
    token_id_limit: int
    kv_cache_memory: str

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> Plan:
        if args.smoke:
            return cls("cpu", torch.float32, 3, 24, 6, 8, 500, "64MiB")
        return cls("cuda", torch.bfloat16, 256, 1024, 1024, 256, 10000, args.kv_cache_memory)


def shape_config(hf_config: dict[str, Any], smoke: bool) -> dict[str, Any]:
    if not smoke:
        return dict(hf_config)
    return {**hf_config, **SMOKE_SIZES, **(SMOKE_MOE_SIZES if "num_experts" in hf_config else {})}


def model_shape(hf_config: dict[str, Any], dtype: torch.dtype) -> ModelShape:
    """The roofline's shape; a mixture of experts counts the MLP a token runs through (its chosen
    experts), which is what a decode step of one sequence reads."""
    routed = "num_experts" in hf_config
    active = hf_config["num_experts_per_tok"] * hf_config["moe_intermediate_size"] if routed else 0
    return ModelShape(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=active or hf_config["intermediate_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        num_kv_heads=hf_config["num_key_value_heads"],
        head_dim=hf_config["head_dim"],
        tie_word_embeddings=hf_config["tie_word_embeddings"],
        bytes_per_param=torch.empty((), dtype=dtype).element_size(),
    )


# ---- ceilings -------------------------------------------------------------------------------


def _timed(fn: Any, device: str, repeats: int, host_only: bool = False) -> float:
    """Seconds per call, after one warm-up call; with ``host_only``, the host's seconds in the
    calls alone, without waiting for the device to finish what they queued."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    host_end = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
    return ((host_end if host_only else time.perf_counter()) - start) / repeats


def measure_ceilings(plan: Plan) -> Ceilings:
    """Device copy bandwidth (bytes read + written) and the dtype's large-matmul rate."""
    numel = (1 << 28) if plan.device == "cuda" else (1 << 22)
    src = torch.empty(numel, dtype=torch.uint8, device=plan.device)
    dst = torch.empty_like(src)
    copy_s = _timed(lambda: dst.copy_(src), plan.device, 20)
    n = 8192 if plan.device == "cuda" else 256
    a = torch.randn(n, n, dtype=plan.dtype, device=plan.device)
    b = torch.randn(n, n, dtype=plan.dtype, device=plan.device)
    matmul_s = _timed(lambda: a @ b, plan.device, 10)
    return Ceilings(bandwidth_bytes_s=2 * numel / copy_s, matmul_flops_s=2 * n**3 / matmul_s)


# ---- models with random weights ---------------------------------------------------------------


def write_model_folder(folder: Path, hf_config: dict[str, Any]) -> Path:
    """config.json and a word-level tokenizer over the whole vocabulary; no weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config))
    vocab = {f"t{i}": i for i in range(hf_config["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def build_random_model(path: Path, cfg: Any, max_positions: int, dtype: torch.dtype, device: str) -> CausalLM:
    """inferd's model built on the device with its random init (the loader's dummy format)."""
    from inferd.models.loader import load_model

    torch.manual_seed(0)
    return load_model(path, cfg, max_positions, dtype, device, load_format="dummy")


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- correctness: Triton against PyTorch ------------------------------------------------------


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30))


def paged_step(
    context_lens: list[int], query_lens: list[int], block_size: int, device: str
) -> tuple[Any, int]:
    """Metadata of one step whose sequences own shuffled blocks; returns it and the block count."""
    from inferd.attention.base import AttentionMetadata

    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq)
    order = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    slots: list[int] = []
    for i, (context, total) in enumerate(zip(context_lens, seq_lens, strict=True)):
        own, order = order[: blocks_per_seq[i]], order[blocks_per_seq[i] :]
        tables[i, : len(own)] = torch.tensor(own, dtype=torch.int32)
        slots += [own[p // block_size] * block_size + p % block_size for p in range(context, total)]
    return AttentionMetadata.from_host(slots, query_lens, seq_lens, tables, device), num_blocks


# A cap low enough to bend the random scores of the kernel checks (Gemma 2's layers cap at 50).
CHECK_SOFTCAP = 2.0


def check_kernels(hf_config: dict[str, Any], plan: Plan) -> dict[str, float]:
    """Attention outputs of both backends on the model's head layout: a decode step with ragged
    contexts, and a mixed step (fresh prompts, chunks after cached context, decode rows); each
    also with the scores soft-capped (``_softcapped``), as Gemma 2's layers run."""
    from inferd.attention.torch_backend import TorchAttentionBackend
    from inferd.attention.triton_backend import TritonAttentionBackend

    heads, kv_heads, dim = (hf_config[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
    limit = plan.max_prompt_len + plan.max_output_len
    steps = {
        "decode": ([1, 17, limit // 3, limit - 1] * 4, [1] * 16),
        "extend": ([0, 0, limit // 4, 40, limit // 2], [plan.max_prompt_len // 2, 3, 64, 9, 1]),
    }
    errors = {}
    for name, (context_lens, query_lens) in steps.items():
        meta, num_blocks = paged_step(context_lens, query_lens, 16, plan.device)
        tokens = sum(query_lens)
        q = torch.randn(tokens, heads, dim, dtype=plan.dtype, device=plan.device)
        k, v = (torch.randn(tokens, kv_heads, dim, dtype=plan.dtype, device=plan.device) for _ in range(2))
        cache = torch.randn(2, num_blocks, 16, kv_heads, dim, dtype=plan.dtype, device=plan.device)
        for softcap, label in ((0.0, ""), (CHECK_SOFTCAP, "_softcapped")):
            outputs = []
            for backend in (TritonAttentionBackend(), TorchAttentionBackend()):
                k_cache, v_cache = cache[0].clone(), cache[1].clone()
                outputs.append(backend.forward(q, k, v, k_cache, v_cache, meta, dim**-0.5, softcap=softcap))
            errors[f"attention_{name}{label}"] = relative_error(outputs[0], outputs[1])
    return errors


@torch.inference_mode()
def check_model_forward(folder: Path, hf_config: dict[str, Any], plan: Plan) -> float:
    """Final hidden states of one random-weight model over a mixed step, per backend."""
    from inferd.attention.torch_backend import TorchAttentionBackend
    from inferd.attention.triton_backend import TritonAttentionBackend
    from inferd.config import ModelConfig

    cfg = ModelConfig.from_hf_config(hf_config)
    model = build_random_model(folder, cfg, 2 * plan.max_prompt_len, plan.dtype, plan.device)
    query_lens = [plan.max_prompt_len // 2, 5, 1]
    meta, num_blocks = paged_step([0, 20, 30], query_lens, 16, plan.device)
    tokens = sum(query_lens)
    input_ids = torch.randint(0, plan.token_id_limit, (tokens,), device=plan.device)
    spans = zip(meta.seq_lens_host, query_lens, strict=True)
    positions = torch.cat([torch.arange(n - q, n) for n, q in spans])
    cache_shape = (num_blocks, 16, cfg.num_kv_heads, cfg.head_dim)
    hidden = []
    for backend in (TritonAttentionBackend(), TorchAttentionBackend()):
        torch.manual_seed(1)  # the same earlier context in both caches
        caches = [
            (torch.randn(cache_shape, dtype=plan.dtype, device=plan.device),
             torch.randn(cache_shape, dtype=plan.dtype, device=plan.device))
            for _ in range(cfg.num_layers)
        ]  # fmt: skip
        hidden.append(model(input_ids, positions.to(plan.device), caches, meta, backend))
    del model, caches
    free_device_memory()
    return relative_error(hidden[0], hidden[1])


# ---- speed --------------------------------------------------------------------------------------

# (keys per tile, warps, pipelining stages) for the decode kernel sweep. Compiled for sm_90a
# (kernel_report.py), 64 keys with 4 stages is the same kernel as with 3: the paged loads do not
# pipeline deeper.
DECODE_TILES = [
    (64, 4, 3), (32, 4, 3), (64, 8, 3), (128, 4, 3), (128, 8, 3), (32, 2, 3), (64, 2, 3), (64, 4, 2),
    (128, 4, 2), (32, 4, 5),
]  # fmt: skip
# Tiles timed again with the programs launched heads first (``_DECODE_HEADS_FIRST``).
DECODE_HEADS_FIRST_TILES = [(64, 4, 3), (128, 4, 3), (64, 4, 2)]


def sweep_decode_kernel(hf_config: dict[str, Any], plan: Plan, ceilings: Ceilings) -> list[dict[str, Any]]:
    """Paged decode attention alone, at the workload's batch and mid-run context lengths, for
    each decode tile (keys, warps, stages; some launched heads first too): time per call and KV
    bytes read per second against the copy bandwidth. Each tile's output is checked against the
    kernels' current default tile's."""
    from inferd.attention import triton_kernels

    heads, kv_heads, dim = (hf_config[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
    rng = random.Random(0)
    limit = plan.max_prompt_len + plan.max_output_len
    context_lens = [rng.randint(limit // 20, limit - 1) for _ in range(plan.num_seqs)]
    meta, num_blocks = paged_step(context_lens, [1] * plan.num_seqs, 16, plan.device)
    q = torch.randn(plan.num_seqs, heads, dim, dtype=plan.dtype, device=plan.device)
    k_cache, v_cache = (
        torch.randn(num_blocks, 16, kv_heads, dim, dtype=plan.dtype, device=plan.device) for _ in range(2)
    )
    splits = triton_kernels.default_num_splits(
        plan.num_seqs, kv_heads, meta.max_seq_len, triton_kernels.num_sms(torch.device(plan.device))
    )
    kv_bytes = sum(meta.seq_lens_host) * kv_heads * dim * 2 * k_cache.element_size()
    tile_names = ("_DECODE_BLOCK_N", "_DECODE_NUM_WARPS", "_DECODE_NUM_STAGES", "_DECODE_HEADS_FIRST")
    tiles = [(*tile, False) for tile in DECODE_TILES] + [(*tile, True) for tile in DECODE_HEADS_FIRST_TILES]
    tiles = tiles if plan.device == "cuda" else [tiles[0], tiles[1], tiles[-1]]

    def call() -> torch.Tensor:
        return triton_kernels.paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, dim**-0.5, splits
        )

    reference = call()
    results: list[dict[str, Any]] = []
    for tile in tiles:
        if out_of_time(results):
            break
        block_n, warps, stages, heads_first = tile
        entry: dict[str, Any] = {"block_n": block_n, "num_warps": warps, "num_stages": stages,
                                 "heads_first": heads_first, "num_splits": splits}  # fmt: skip
        with patched_modules(
            {(triton_kernels.__name__, name): value for name, value in zip(tile_names, tile, strict=True)}
        ):
            entry["relative_error_vs_default"] = relative_error(call(), reference)
            seconds = _timed(call, plan.device, 20 if plan.device == "cuda" else 1)
        entry["us"] = seconds * 1e6
        entry["kv_bytes_per_s"] = kv_bytes / seconds
        entry["fraction_of_bandwidth"] = kv_bytes / seconds / ceilings.bandwidth_bytes_s
        print("decode tile:", json.dumps(entry), flush=True)
        results.append(entry)
    return results


# Rows sampled at once for the sampler timing: batch 1, a drained workload, its full batch.
SAMPLER_ROWS = (1, 64, 256)


def time_sampler(hf_config: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    """The engine's sampler alone on random logits of the model's vocabulary: milliseconds per
    step, greedy and at the workload's temperature 0.6 (the exponential race over the softmax),
    host work included (each call ends with the device synchronized). At 256 rows of Qwen3's
    151,936 tokens a float32 pass over the logits moves 155 MB, and the random path makes several.
    At temperature 0.6 the fused kernels (``triton_sampling``) are timed too, as ``path`` "fused"
    (the race) and "fused_inverse_cdf" (``fused_sampler="inverse_cdf"``), each after a check that
    at a tiny temperature it draws every row's argmax (``draws_argmax``): a broken kernel's time
    would say nothing."""
    from inferd.sample.sampler import Sampler

    # The kernels at every row count, below the engine's FUSED_MIN_ROWS too: what chose it.
    samplers = {
        "torch": Sampler(0),
        "fused": Sampler(0, triton_sampling=True, fused_min_rows=1, fused_kernel="race"),
        "fused_inverse_cdf": Sampler(0, triton_sampling=True, fused_min_rows=1, fused_kernel="inverse_cdf"),
    }
    results: list[dict[str, Any]] = []
    for rows in SAMPLER_ROWS if plan.device == "cuda" else (2,):
        seeded = torch.Generator().manual_seed(rows)  # the same logits every run: checks that repeat
        logits = torch.randn(rows, hf_config["vocab_size"], generator=seeded).to(plan.device, plan.dtype)
        for temperature in (0.0, 0.6):
            requests = _sampling_requests(rows, temperature)
            repeats = 20 if plan.device == "cuda" else 1
            for path, sampler in samplers.items():
                if path != "torch" and temperature == 0.0:
                    continue  # greedy rows never reach the kernels
                entry: dict[str, Any] = {"rows": rows, "temperature": temperature, "path": path}
                if path != "torch":
                    entry["draws_argmax"] = _draws_argmax(sampler, logits)
                seconds = _timed(functools.partial(sampler, logits, requests), plan.device, repeats)
                entry["ms"] = seconds * 1e3
                # What the host spends queuing the step (the engine overlaps it with the device's
                # previous step): the rest of "ms" is the device's and the wait for it.
                queued = _timed(
                    functools.partial(sampler.sample, logits, requests), plan.device, repeats, True
                )
                entry["host_ms"] = queued * 1e3
                print("sampler:", json.dumps(entry), flush=True)
                results.append(entry)
        # The three penalties at the workload's temperature, each row with a history of 500 prompt
        # and 100 output tokens (the batch's penalties at once: on a GPU from the count tables of
        # sample/penalty_tables.py). Each call samples each request's next output position, the
        # tokens before it still unread, as under asynchronous scheduling: the steady state, where
        # the same position sampled again would rebuild the counts each call. Then the same with
        # the tables applied by one Triton pass (``triton_penalties``). Each path's logits are
        # first checked against the host's histories.
        for path, fused in (("torch_penalized", False), ("triton_penalized", True)):
            penalized = _sampling_requests(rows, 0.6, penalized=True)
            call = functools.partial(
                _sample_next_position, Sampler(0, triton_penalties=fused), logits, penalized
            )
            entry = {"rows": rows, "temperature": 0.6, "path": path}
            entry["tables_vs_host_max_abs_diff"] = _penalty_forms_differ_by(logits, penalized, fused)
            entry["ms"] = _timed(functools.partial(call, wait=True), plan.device, repeats) * 1e3
            entry["host_ms"] = _timed(functools.partial(call, wait=False), plan.device, repeats, True) * 1e3
            print("sampler:", json.dumps(entry), flush=True)
            results.append(entry)
    return results


def _penalty_forms_differ_by(logits: torch.Tensor, requests: list[Any], fused: bool) -> float:
    """The largest difference between the logits the two forms of the penalties make of the same
    requests (the device's count tables, with ``fused`` through the Triton pass, against the host's
    histories; equal logits, infinities among them, count as 0): a GPU's count tables are checked
    before they are timed."""
    from inferd.sample.penalty_state import HostPenalties
    from inferd.sample.penalty_tables import PenaltyTables

    made = []
    for form in (HostPenalties(), PenaltyTables(fused=fused)):
        processed = logits.float().clone()
        form.apply(processed, requests)
        made.append(processed)
    host, tables = made
    return float(torch.where(host == tables, 0.0, (host - tables).abs()).max())


def _sample_next_position(sampler: Any, logits: torch.Tensor, requests: list[Any], wait: bool) -> None:
    """Samples each request's next output position, the ones before it in flight; with ``wait``,
    reads the tokens, else only queues the work."""
    for request in requests:
        request.num_inflight_tokens += 1
    pending = sampler.sample(logits, requests)
    if wait:
        pending.result()


def _sampling_requests(rows: int, temperature: float, penalized: bool = False) -> list[Any]:
    """One request a row for the sampler alone: a one-token prompt, this temperature; or, with
    ``penalized``, the repetition (1.05), presence (0.5) and frequency (0.3) penalties over a
    history of 500 prompt and 100 output tokens."""
    from inferd.engine.request import Request
    from inferd.sampling_params import SamplingParams

    if not penalized:
        params = SamplingParams(max_tokens=8, temperature=temperature, ignore_eos=True)
        return [Request(str(i), [1], params, frozenset(), 8) for i in range(rows)]
    params = SamplingParams(temperature=temperature, repetition_penalty=1.05, presence_penalty=0.5,
                            frequency_penalty=0.3, ignore_eos=True)  # fmt: skip
    history = random.Random(rows)
    requests = []
    for i in range(rows):
        request = Request(str(i), [history.randrange(10000) for _ in range(500)], params, frozenset(), 200)
        request.output_token_ids = [history.randrange(10000) for _ in range(100)]
        requests.append(request)
    return requests


def _draws_argmax(sampler: Any, logits: torch.Tensor) -> bool:
    """Whether ``sampler`` draws a largest logit of each row at a temperature that leaves no other
    choice (a tie for the largest may go either way: random bfloat16 logits have some)."""
    requests = _sampling_requests(logits.shape[0], temperature=1e-4)
    tokens = torch.tensor(sampler(logits, requests).token_ids, device=logits.device)
    drawn = logits.gather(1, tokens.unsqueeze(1)).squeeze(1)
    return bool((drawn == logits.max(dim=-1).values).all())


# (sequences, shortest context, longest context) for the split sweep, each context drawn uniformly
# in between: the batch-1 benchmark's contexts reach 272 tokens; 1,024 is the workload's middle.
# 32 and 64 sequences of 900 to 2,047 tokens are its tail, where a few (sequence, KV head)
# programs per SM, of uneven lengths, leave SMs idle once the short ones end
# (_DECODE_PROGRAMS_PER_SM).
SPLIT_CASES = [(1, 272, 272), (1, 1024, 1024), (2, 272, 272), (4, 272, 272), (32, 900, 2047), (64, 900, 2047)]
SPLIT_COUNTS = (1, 2, 3, 4, 8)
# --smoke: two sequences past one 64-key tile, so the second split holds keys and the merge runs.
SMOKE_SPLIT_CASES = [(2, 100, 150)]
# KV bytes cycled through per timing: past the 60 MB L2, as a layer's weights would flush it.
SPLIT_ROTATION_BYTES = 96 << 20


def sweep_decode_splits(hf_config: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    """Paged decode attention for a few sequences, unsplit and split (with the merge kernel):
    microseconds per call in a CUDA graph over KV caches cycled past L2. At batch 1 the unsplit
    kernel runs one program per KV head, so this says whether splitting short contexts pays; at 32
    and 64 sequences, whether splitting balances uneven contexts."""
    heads, kv_heads, dim = (hf_config[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
    results: list[dict[str, Any]] = []
    for num_seqs, shortest, context in SPLIT_CASES if plan.device == "cuda" else SMOKE_SPLIT_CASES:
        if out_of_time(results):
            break
        rng = random.Random(num_seqs)
        cached = [rng.randint(shortest, context) - 1 for _ in range(num_seqs)]
        meta, num_blocks = paged_step(cached, [1] * num_seqs, 16, plan.device)
        q = torch.randn(num_seqs, heads, dim, dtype=plan.dtype, device=plan.device)
        cache_bytes = 2 * num_blocks * 16 * kv_heads * dim * q.element_size()
        copies = max(2, -(-SPLIT_ROTATION_BYTES // cache_bytes)) if plan.device == "cuda" else 1
        shape = (num_blocks, 16, kv_heads, dim)
        caches = [
            (torch.randn(shape, dtype=plan.dtype, device=plan.device),
             torch.randn(shape, dtype=plan.dtype, device=plan.device))
            for _ in range(copies)
        ]  # fmt: skip
        reference: torch.Tensor | None = None
        for splits in SPLIT_COUNTS if plan.device == "cuda" else (1, 2):
            calls = [functools.partial(_split_decode, q, meta, cache, splits) for cache in caches]
            out = calls[0]().float()
            reference = out if reference is None else reference
            entry = {"num_seqs": num_seqs, "context": context, "shortest_context": shortest,
                     "num_splits": splits, "us": _seconds_per_call(calls, plan, 20) * 1e6,
                     "relative_error_vs_unsplit": relative_error(out, reference)}  # fmt: skip
            print("decode split:", json.dumps(entry), flush=True)
            results.append(entry)
        del caches
        free_device_memory()
    return results


def _split_decode(q: torch.Tensor, meta: Any, cache: tuple[torch.Tensor, torch.Tensor], splits: int) -> Any:
    from inferd.attention import triton_kernels

    return triton_kernels.paged_decode_attention(
        q, cache[0], cache[1], meta.block_tables, meta.seq_lens, meta.query_start_loc,
        q.shape[-1] ** -0.5, splits,
    )  # fmt: skip


# Decode-step projections (out features, in features) of both shapes, for the skinny matmul sweep.
LINEAR_SHAPES = {
    "qwen3 qkv": (4096, 1024), "qwen3 o": (1024, 2048), "qwen3 gate_up": (6144, 1024),
    "qwen3 down": (1024, 3072), "llama qkv": (6144, 4096), "llama o": (4096, 4096),
    "llama gate_up": (28672, 4096), "llama down": (4096, 14336),
}  # fmt: skip
LINEAR_ROWS = (1, 2, 4)
# (features per program, inner elements per step, warps, stages) tried besides the default tile at
# one and two rows (where they fit the registers).
LINEAR_TILES = [
    (2, 2048, 4, 3), (2, 1024, 4, 4), (4, 1024, 4, 3), (4, 512, 4, 4), (8, 512, 8, 3), (2, 512, 4, 6),
    (2, 2048, 8, 2), (4, 2048, 8, 3),
]  # fmt: skip
# Weight copies cycled through per timing, so each call reads its weights from memory, not L2.
LINEAR_ROTATION_BYTES = 256 << 20


def _seconds_per_call(calls: Sequence[Callable[[], Any]], plan: Plan, repeats: int) -> float:
    """Seconds per call of ``calls`` run back to back. On a GPU they are captured in one CUDA
    graph, as a decode step runs them, and the graph's replays are timed with device events."""
    if plan.device != "cuda":
        return _timed(lambda: [call() for call in calls], plan.device, repeats) / len(calls)
    for call in calls:  # compile and warm up outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats / len(calls)


LinearPath = Callable[[torch.Tensor], torch.Tensor]  # one weight copy -> the projection's output
# For (shape name, rows, in_features): the float32 reference and the labelled paths to time.
PathsFor = Callable[[str, int, int], tuple[LinearPath, list[tuple[str, LinearPath]]]]


def _sweep_linear_paths(
    plan: Plan,
    ceilings: Ceilings,
    title: str,
    shapes: dict[str, tuple[int, int]],
    rows_list: tuple[int, ...],
    paths_for: PathsFor,
) -> list[dict[str, Any]]:
    """Each path of each (shape, rows) timed alone: microseconds per call in a CUDA graph of
    back-to-back calls over weight copies cycled past L2, weight bytes read per second against the
    copy bandwidth, and its relative error against the path's float32 reference. A path that
    fails (a tile the compiler rejects, say) is recorded with its error and the sweep goes on."""
    results: list[dict[str, Any]] = []
    for name, (out_features, in_features) in shapes.items():
        if out_of_time(results):
            break
        weight_bytes = out_features * in_features * torch.empty((), dtype=plan.dtype).element_size()
        copies = max(2, -(-LINEAR_ROTATION_BYTES // weight_bytes)) if plan.device == "cuda" else 1
        scale = in_features**-0.5
        weights = [torch.randn(out_features, in_features, dtype=plan.dtype, device=plan.device) * scale
                   for _ in range(copies)]  # fmt: skip
        for rows in rows_list:
            reference, paths = paths_for(name, rows, in_features)
            expected = reference(weights[0])
            for label, fn in paths:
                entry: dict[str, Any] = {"shape": name, "rows": rows, "kernel": label}
                try:
                    entry["relative_error"] = relative_error(fn(weights[0]).float(), expected)
                    seconds = _seconds_per_call([functools.partial(fn, w) for w in weights], plan, 10)
                except Exception as error:
                    entry["error"] = repr(error)[:300]
                else:
                    entry["us"] = seconds * 1e6
                    entry["fraction_of_bandwidth"] = weight_bytes / seconds / ceilings.bandwidth_bytes_s
                results.append(entry)
            print(f"{title}, {name}, {rows} rows: {_fastest_paths(results[-len(paths) :])}", flush=True)
        del weights
        free_device_memory()
    return results


def _fastest_paths(results: list[dict[str, Any]]) -> str:
    """The first two paths' times (the baseline and the default) and the fastest one's."""
    timed = [r for r in results if "us" in r]
    if not timed:
        return "no path ran"
    shown = [f"{r['kernel']} {r['us']:.1f} us" for r in timed[:2]]
    fastest = min(timed, key=lambda r: r["us"])
    return "; ".join(shown) + (
        f"; fastest {fastest['kernel']} {fastest['us']:.1f} us" if fastest not in timed[:2] else ""
    )


def _random_rows(plan: Plan, rows: int, width: int) -> torch.Tensor:
    return torch.randn(rows, width, dtype=plan.dtype, device=plan.device)


def sweep_skinny_linear(plan: Plan, ceilings: Ceilings) -> list[dict[str, Any]]:
    """The decode-step projections alone, cuBLAS (``F.linear``) against the skinny Triton matmul,
    for the rows of ``LINEAR_ROWS``: its default tile and, at one and two rows, the tiles of
    ``LINEAR_TILES``."""
    from inferd.layers import triton_linear

    tiles = [triton_linear.SkinnyTile(*t) for t in LINEAR_TILES] if plan.device == "cuda" else []
    linear = torch.nn.functional.linear

    def paths_for(name: str, rows: int, in_features: int) -> tuple[LinearPath, list[tuple[str, LinearPath]]]:
        x = _random_rows(plan, rows, in_features)
        paths: list[tuple[str, LinearPath]] = [
            ("cublas", lambda w: linear(x, w)),
            ("triton default", lambda w: triton_linear.skinny_linear(x, w)),
        ]
        if rows <= 2:
            paths += [
                (_tile_label("triton", t), functools.partial(triton_linear.skinny_linear, x, tile=t))
                for t in tiles
                if rows * t.block_n * t.block_k <= 256 * t.num_warps * 32  # products held in registers
            ]  # fmt: skip
        return (lambda w: linear(x.float(), w.float())), paths

    shapes = LINEAR_SHAPES if plan.device == "cuda" else {"toy": (40, 64)}
    return _sweep_linear_paths(plan, ceilings, "skinny linear", shapes, LINEAR_ROWS, paths_for)


# Wide projections (4,096 features or more) at the rows of decode steps past the skinny matmul's.
TILED_SHAPES = {
    "qwen3 qkv": (4096, 1024), "qwen3 gate_up": (6144, 1024), "llama qkv": (6144, 4096),
    "llama o": (4096, 4096), "llama gate_up": (28672, 4096), "llama down": (4096, 14336),
}  # fmt: skip
TILED_ROWS = (2, 4, 8, 16, 32, 64, 128, 256)
# (rows per program, features, inner elements per step, warps, stages) tried besides the default
# at 16 and 64 rows, with the rows per program set to the step's.
TILED_TILES = [(16, 64, 128, 4, 4), (64, 64, 64, 4, 4), (16, 32, 256, 4, 3), (64, 32, 64, 4, 5),
               (16, 16, 256, 4, 4), (64, 64, 128, 8, 3)]  # fmt: skip


def sweep_tiled_linear(plan: Plan, ceilings: Ceilings) -> list[dict[str, Any]]:
    """Wide projections at 8 to 256 rows, cuBLAS against the tensor-core Triton matmul of
    ``layers/triton_tiled_linear.py`` (its default tile; at 16 and 64 rows the tiles of
    ``TILED_TILES`` too): what ``triton_tiled_linear`` would route, and which tile to keep."""
    from inferd.layers import triton_tiled_linear

    linear = torch.nn.functional.linear
    tiles = [triton_tiled_linear.TiledTile(*t) for t in TILED_TILES] if plan.device == "cuda" else []

    def paths_for(name: str, rows: int, in_features: int) -> tuple[LinearPath, list[tuple[str, LinearPath]]]:
        x = _random_rows(plan, rows, in_features)
        paths: list[tuple[str, LinearPath]] = [
            ("cublas", lambda w: linear(x, w)),
            ("triton default", lambda w: triton_tiled_linear.tiled_linear(x, w)),
        ]
        paths += [
            (f"triton {t.block_m}x{t.block_n}x{t.block_k} w{t.num_warps} s{t.num_stages}",
             functools.partial(triton_tiled_linear.tiled_linear, x, tile=t))
            for t in tiles
            if t.block_m == rows
        ]  # fmt: skip
        return (lambda w: linear(x.float(), w.float())), paths

    shapes = TILED_SHAPES if plan.device == "cuda" else {"toy": (40, 64)}
    rows_list = TILED_ROWS if plan.device == "cuda" else (3, 20)
    return _sweep_linear_paths(plan, ceilings, "tiled linear", shapes, rows_list, paths_for)


# Projections whose input a layer makes with a small op first: the add + RMSNorm before q|k|v and
# gate|up, SiLU-and-mul before down. Qwen3-0.6B's shapes; Llama-3.1-8B's by how large they are.
FUSED_INPUT_SHAPES = {
    "qwen3 qkv": (4096, 1024, "norm"),
    "qwen3 gate_up": (6144, 1024, "norm"),
    "qwen3 down": (1024, 3072, "silu"),
    "llama qkv": (6144, 4096, "norm"),
    "llama down": (4096, 14336, "silu"),
}
_NORM_EPS = 1e-6


def sweep_fused_inputs(plan: Plan, ceilings: Ceilings) -> list[dict[str, Any]]:
    """At one and two rows, the small op then the skinny matmul (two launches, as the engine runs
    them by default) against the matmul that makes its input on load (``triton_fused_linear``),
    and the small op then cuBLAS. Each result's relative error is against the float32 torch layers."""
    shapes = FUSED_INPUT_SHAPES if plan.device == "cuda" else {"toy norm": (40, 64, "norm"),
                                                                "toy silu": (40, 64, "silu")}  # fmt: skip

    def paths_for(name: str, rows: int, in_features: int) -> tuple[LinearPath, list[tuple[str, LinearPath]]]:
        op = shapes[name][2]
        x = _random_rows(plan, rows, in_features * (2 if op == "silu" else 1))
        residual = _random_rows(plan, rows, in_features)
        norm_weight = torch.rand(in_features, dtype=plan.dtype, device=plan.device) + 0.5
        return _fused_input_paths(op, x, residual, norm_weight)

    sizes = {name: (out_features, in_features) for name, (out_features, in_features, _) in shapes.items()}
    return _sweep_linear_paths(plan, ceilings, "fused inputs", sizes, (1, 2), paths_for)


# (features per program, inner elements per step, warps, stages) tried for the fused kernels
# besides the default tile (on a GPU): the first is the plain kernel's tile, the fused kernels'
# default until the H200 call of 2026-11-30 measured 8 x 512 faster (default_fused_tile).
FUSED_TILES = [(4, 512, 4, 4), (4, 256, 4, 6), (8, 256, 8, 4)]


def _fused_input_paths(
    op: str, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor
) -> tuple[LinearPath, list[tuple[str, LinearPath]]]:
    """The float32 reference and the timed paths of one projection with its input op."""
    from inferd.layers import triton_linear, triton_ops
    from inferd.layers.activation import silu_and_mul

    linear = torch.nn.functional.linear
    tiles = [triton_linear.SkinnyTile(*t) for t in FUSED_TILES] if x.is_cuda else []
    if op == "silu":

        def fused_silu(w: torch.Tensor, tile: Any = None) -> torch.Tensor:
            return triton_linear.skinny_silu_linear(x, w, tile=tile)

        return (lambda w: linear(silu_and_mul(x.float()), w.float())), [
            ("silu, cublas", lambda w: linear(triton_ops.silu_and_mul(x), w)),
            ("silu, triton", lambda w: triton_linear.skinny_linear(triton_ops.silu_and_mul(x), w)),
            ("fused", fused_silu),
            *[(_tile_label("fused", t), functools.partial(fused_silu, tile=t)) for t in tiles],
        ]
    h = (x.float() + residual.float()).to(x.dtype).float()
    normed32 = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _NORM_EPS) * norm_weight.float()

    def normed() -> torch.Tensor:
        return triton_ops.fused_add_rms_norm(x, residual, norm_weight, _NORM_EPS)[0]

    def fused_norm(w: torch.Tensor, tile: Any = None) -> torch.Tensor:
        return triton_linear.skinny_norm_linear(x, residual, norm_weight, _NORM_EPS, w, tile=tile)[0]

    return (lambda w: linear(normed32, w.float())), [
        ("norm, cublas", lambda w: linear(normed(), w)),
        ("norm, triton", lambda w: triton_linear.skinny_linear(normed(), w)),
        ("fused", fused_norm),
        *[(_tile_label("fused", t), functools.partial(fused_norm, tile=t)) for t in tiles],
    ]


def _tile_label(kernel: str, tile: Any) -> str:
    return f"{kernel} {tile.block_n}x{tile.block_k} w{tile.num_warps} s{tile.num_stages}"


def nano_vllm_workload(plan: Plan) -> tuple[list[list[int]], list[int]]:
    """nano-vllm's bench.py workload: prompts drawn first, then output lengths, from seed 0.
    Token ids are drawn as nano-vllm draws them, ``randint(0, 10000)`` (both ends included)."""
    rng = random.Random(0)
    low = min(100, plan.max_prompt_len)
    prompts = [
        [rng.randint(0, plan.token_id_limit) for _ in range(rng.randint(low, plan.max_prompt_len))]
        for _ in range(plan.num_seqs)
    ]
    low = min(100, plan.max_output_len)
    output_lens = [rng.randint(low, plan.max_output_len) for _ in range(plan.num_seqs)]
    return prompts, output_lens


def inferd_engine(folder: Path, plan: Plan, backend: str, options: dict[str, Any]) -> Any:
    from inferd.llm import LLM

    settings = {
        "device": plan.device, "dtype": str(plan.dtype).removeprefix("torch."), "attention_backend": backend,
        "max_model_len": plan.max_prompt_len + plan.max_output_len, "max_num_seqs": plan.num_seqs,
        "max_num_batched_tokens": 16384, "kv_cache_memory": plan.kv_cache_memory, **options,
    }  # fmt: skip
    return LLM(folder, load_format="dummy", **settings)


# Decode steps grouped by batch size, upper bounds: where the workload's time goes as it drains.
STEP_BUCKETS = (2, 8, 32, 64, 128, 256, 512)


class StepTimes:
    """Times the gap between consecutive step launches (with asynchronous scheduling, the step's
    period: the device's time or the host's, whichever is longer) and groups the steps into those
    with prompt tokens and pure decode steps by batch size. Wraps the runner's ``launch``.

    Per group it also sums the host's time inside ``launch`` (building the inputs, queueing the
    forward and the sampling) and, with ``timing_event`` (a factory of CUDA events), the device's
    time from each step's first operation (the copy of its inputs, after the host has built them)
    to the end of its queued work: a group whose device time is well under its period leaves the
    GPU idle, waiting for the host. With ``floor`` (a step's ``(start, num_tokens)`` spans to its
    roofline floor in seconds), each group gets the floor of its steps as scheduled too: which
    steps are furthest from it."""

    def __init__(
        self,
        runner: Any,
        floor: Callable[[list[tuple[int, int]]], float] | None = None,
        timing_event: Callable[[], Any] | None = None,
    ) -> None:
        self.launches: list[tuple[float, str]] = []
        self._host_seconds: list[float] = []
        self._spans: list[list[tuple[int, int]]] = []
        # (launch index, event at its input copy, event after its launch), per launch that copied.
        self._events: list[tuple[int, Any, Any]] = []
        self._pending_start: Any = None  # this launch's first event, until its input copy
        self._recorded_start: Any = None  # ... and once the copy has recorded it
        self._floor = floor
        self._timing_event = timing_event
        self._runner = runner
        self._launch = runner.launch
        runner.launch = self._timed_launch
        self._copy = runner.buffers.copy_to_device
        runner.buffers.copy_to_device = self._timed_copy

    def _timed_copy(self, *args: Any) -> Any:
        if self._pending_start is not None:
            self._pending_start.record()
            self._recorded_start, self._pending_start = self._pending_start, None
        return self._copy(*args)

    def _timed_launch(self, out: Any, *args: Any) -> Any:
        start = time.perf_counter()
        prompt = any(seq.num_tokens > 1 for seq in out.sequences)
        rows = len(out.sequences)
        bucket = next((b for b in STEP_BUCKETS if rows <= b), STEP_BUCKETS[-1])
        self.launches.append((start, "with prompt tokens" if prompt else f"decode <= {bucket}"))
        if self._floor is not None:
            self._spans.append([(seq.start_pos, seq.num_tokens) for seq in out.sequences])
        if self._timing_event is not None:
            self._pending_start = self._timing_event()
        try:
            launched = self._launch(out, *args)
        finally:
            recorded, self._recorded_start, self._pending_start = self._recorded_start, None, None
        if recorded is not None and self._timing_event is not None:
            end = self._timing_event()
            end.record()
            self._events.append((len(self.launches) - 1, recorded, end))
        self._host_seconds.append(time.perf_counter() - start)
        return launched

    def close(self, end: float) -> dict[str, dict[str, float]]:
        """Per group: steps, seconds, milliseconds per step, the host's seconds inside ``launch``,
        with events the device's busy seconds and their fraction of the group's, and with a floor
        its seconds and the fraction of the group's time it is; the last step runs until ``end``
        (events are read after the caller's synchronize)."""
        # The instance attributes go; the classes' methods are back.
        del self._runner.launch
        del self._runner.buffers.copy_to_device
        groups: dict[str, dict[str, float]] = {}
        for (start, kind), (finish, _) in zip(self.launches, [*self.launches[1:], (end, "")], strict=True):
            group = groups.setdefault(kind, {"steps": 0, "seconds": 0.0, "host_launch_seconds": 0.0})
            group["steps"] += 1
            group["seconds"] += finish - start
        for (_, kind), host in zip(self.launches, self._host_seconds, strict=False):
            groups[kind]["host_launch_seconds"] += host
        try:
            busy = [(index, begun.elapsed_time(done) / 1e3) for index, begun, done in self._events]
        except RuntimeError:  # a failed run's last events may never have been reached
            busy = []
        for index, seconds in busy:
            group = groups[self.launches[index][1]]
            group["device_busy_seconds"] = group.get("device_busy_seconds", 0.0) + seconds
        if self._floor is not None:
            for (_, kind), spans in zip(self.launches, self._spans, strict=True):
                groups[kind]["floor_seconds"] = groups[kind].get("floor_seconds", 0.0) + self._floor(spans)
        for group in groups.values():
            group["ms_per_step"] = 1e3 * group["seconds"] / group["steps"]
            if "device_busy_seconds" in group:
                group["device_busy_fraction"] = group["device_busy_seconds"] / group["seconds"]
            if "floor_seconds" in group:
                group["fraction_of_floor"] = group["floor_seconds"] / group["seconds"]
        return groups


class KernelCompiles:
    """Triton compiles while it is open, through Triton's JIT hooks (called before and after each
    compile a launch needs): which kernels and how many seconds. A compile inside a timed run is
    time the warm-up should have spent. The interpreter compiles nothing."""

    def __init__(self) -> None:
        self.compiles: list[dict[str, Any]] = []
        self._started: dict[str, float] = {}

    def __enter__(self) -> KernelCompiles:
        from triton import knobs

        self._saved = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._before, self._after
        return self

    def __exit__(self, *exc: object) -> None:
        from triton import knobs

        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._saved

    def _before(self, *, key: Any, **_: Any) -> None:
        self._started[str(key)] = time.perf_counter()

    def _after(self, *, key: Any, repr: str, fn: Any, **_: Any) -> None:
        started = self._started.pop(str(key), None)
        seconds = time.perf_counter() - started if started is not None else 0.0
        self.compiles.append({"kernel": getattr(fn, "name", repr.split("[")[0]), "seconds": seconds})

    def summary(self) -> dict[str, Any]:
        return {"count": len(self.compiles), "seconds": sum(c["seconds"] for c in self.compiles),
                "kernels": sorted({c["kernel"] for c in self.compiles})}  # fmt: skip


def run_inferd_workload(
    llm: Any,
    prompts: list[list[int]],
    output_lens: list[int],
    step_floor: Callable[[list[tuple[int, int]]], float] | None = None,
) -> dict[str, Any]:
    """The workload through ``llm``, its steps timed by group (``StepTimes``, with ``step_floor``
    the floor of each group's steps too)."""
    from inferd.sampling_params import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0.6, ignore_eos=True) for n in output_lens]
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    _sync()
    on_gpu = torch.cuda.is_available() and llm.engine.config.device.startswith("cuda")
    timing_event = functools.partial(torch.cuda.Event, enable_timing=True) if on_gpu else None
    steps = StepTimes(llm.engine.core.runner, step_floor, timing_event)
    start = time.perf_counter()
    try:
        with KernelCompiles() as compiles:
            outputs = llm.generate(prompts, params)
            _sync()
    finally:
        end = time.perf_counter()
        step_times = steps.close(end)
    produced = sum(len(out.token_ids) for out in outputs)
    elapsed = end - start
    first_launch = steps.launches[0][0] if steps.launches else end
    return {"seconds": elapsed, "output_tokens": produced, "output_tok_s": produced / elapsed,
            "steps": step_times, "before_first_step_s": first_launch - start,
            "kernel_compiles": compiles.summary()}  # fmt: skip


# The greedy check of a variant: prompts run together (a batch's paths: tiled matmuls, graphs of
# several sequences) and one alone (the skinny and fused matmuls of one row), fewer together in
# a smaller plan (the smoke run's three sequences). The Llama engine runs one sequence at a time
# (max_num_seqs 1), so there all of them take the one-row paths.
AGREEMENT_BATCH = 8
AGREEMENT_TOKENS = 16
# A greedy run: per prompt, its tokens and the log-probability of each.
GreedyRun = list[tuple[list[int], list[float]]]


def greedy_tokens(llm: Any, plan: Plan) -> GreedyRun:
    """Greedy tokens, with their log-probabilities, for up to ``AGREEMENT_BATCH`` prompts decoded
    together, then one more alone; prompts of 20 tokens and up, within the plan's prompt length."""
    from inferd.sampling_params import SamplingParams

    together = min(AGREEMENT_BATCH, plan.num_seqs - 1)
    prompts = [
        [(11 * i + 3 * j + 1) % plan.token_id_limit for j in range(min(20 + i, plan.max_prompt_len))]
        for i in range(together + 1)
    ]
    params = SamplingParams(
        max_tokens=min(AGREEMENT_TOKENS, plan.max_output_len), temperature=0.0, ignore_eos=True, logprobs=0
    )
    batch = llm.generate(prompts[:-1], params)
    (alone,) = llm.generate(prompts[-1:], params)
    return [(list(out.token_ids), [lp.logprob for lp in out.logprobs]) for out in [*batch, alone]]


def greedy_agreement(run: GreedyRun, reference: GreedyRun) -> dict[str, Any]:
    """How far each prompt's greedy tokens follow the reference engine's (``same_prefix``, and
    ``same_fraction`` of all tokens), and the largest difference between the two engines'
    log-probabilities of the tokens both chose (``logprob_max_diff``, over each prompt's common
    prefix; None when no prompt has one). A kernel that computes something else moves the
    log-probabilities from the first token on, even where the argmax survives; bf16 sums in
    another order move them by about a hundredth, and flip an occasional near-tie of random
    weights' logits (the rest of that prompt then differs too)."""
    prefixes: list[int] = []
    largest = 0.0
    for (ours, our_logprobs), (theirs, their_logprobs) in zip(run, reference, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(theirs))
        prefixes.append(same)
        diffs = [abs(a - b) for a, b in zip(our_logprobs[:same], their_logprobs[:same], strict=True)]
        largest = max([largest, *diffs])
    total = sum(len(theirs) for theirs, _ in reference)
    return {"same_prefix": prefixes, "same_fraction": sum(prefixes) / total if total else 1.0,
            "logprob_max_diff": largest if any(prefixes) else None}  # fmt: skip


def run_inferd_batch1(llm: Any, plan: Plan) -> dict[str, float]:
    from inferd.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=plan.decode_tokens, temperature=0.0, ignore_eos=True)
    prompt = list(range(1, BATCH1_PROMPT_LEN + 1))
    llm.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    (out,) = llm.generate([prompt], params)
    elapsed = time.perf_counter() - start
    m = out.metrics
    assert m.first_token_time is not None and m.finished_time is not None
    decode_s = m.finished_time - m.first_token_time
    return {
        "seconds": elapsed,
        "output_tokens": len(out.token_ids),
        "output_tok_s": len(out.token_ids) / elapsed,
        "decode_tok_s": (len(out.token_ids) - 1) / decode_s,
    }


def run_transformers_workload(
    hf_config: dict[str, Any], plan: Plan, prompts: list[list[int]], output_lens: list[int]
) -> dict[str, Any]:
    """transformers' own continuous batching (``init_continuous_batching``) on the same workload."""
    import transformers

    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "architectures"})
    torch.manual_seed(0)
    with torch.device(plan.device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=plan.dtype).eval()
    longest = max(output_lens)
    generation = transformers.GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=longest)
    # On the CPU transformers would size its cache from the RAM; the smoke run asks for a toy one.
    sizes = {}
    if plan.device != "cuda":
        toy_cache = transformers.ContinuousBatchingConfig(num_blocks=8, max_batch_tokens=128)
        sizes["continuous_batching_config"] = toy_cache
    manager = model.init_continuous_batching(generation_config=generation, **sizes)
    with torch.inference_mode():  # the generation thread takes the mode of the thread that starts it
        manager.start()
    try:
        # A short request first, so one-time work (compilation, graph capture) stays off the clock.
        collect_transformers_results(manager, "warmup", [prompts[0][:16]], [4])
        start = time.perf_counter()
        produced = collect_transformers_results(manager, "run", prompts, output_lens)
        elapsed = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    del model, manager
    free_device_memory()
    tok_s = produced / elapsed
    return {"seconds": elapsed, "output_tokens": produced, "output_tok_s": tok_s, "source": "this run"}


def collect_transformers_results(
    manager: Any, tag: str, prompts: list[list[int]], output_lens: list[int]
) -> int:
    """Queue the requests, wait for every one to finish; returns the number of tokens generated."""
    for i, (prompt, n) in enumerate(zip(prompts, output_lens, strict=True)):
        manager.add_request(prompt, request_id=f"{tag}-{i}", max_new_tokens=n)
    produced = 0
    for _ in prompts:
        result = manager.get_result(timeout=600)
        while result is not None and not result.is_finished():
            result = manager.get_result(timeout=600)
        if result is None:
            raise RuntimeError("transformers' continuous batching stopped before finishing")
        if result.error is not None:
            raise RuntimeError(f"transformers' request {result.request_id} failed: {result.error}")
        produced += len(result.generated_tokens)
    return produced


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---- the run ----------------------------------------------------------------------------------


def device_name(plan: Plan) -> str:
    return torch.cuda.get_device_name() if plan.device == "cuda" else "cpu (smoke)"


# Engine variants timed on batch-1 decode: what asynchronous scheduling, CUDA graphs and the
# Triton small ops each give ("sync" times the workload too).
# Engine options off by default whose figures come from a part of their own rather than from the
# engine variants: the penalties' Triton pass acts on penalized requests only, which the workloads
# have none of, so the sampler part times it ("triton_penalized" against "torch_penalized"). Left
# out of all_unmeasured: a kernel that failed to compile there would lose that variant's figures.
MEASURED_IN_PARTS = {"triton_penalties": "sampler"}

VARIANTS = {
    "default": {},
    "sync": {"async_scheduling": False},
    "eager": {"enforce_eager": True},
    "eager_torch_ops": {"enforce_eager": True, "triton_ops": False},
    "cublas_linear": {"triton_linear": False},
    "fused_linear": {"triton_fused_linear": True},
    "split_32": {},
    "tiled_linear": {"triton_tiled_linear": True},
    "decode_rotary": {"triton_decode_rotary": True},
    "pdl_prefetch": {},
    "split_mid_8": {},
    # The default engine without its start-up warm-up: what the warm-up takes off the first run.
    "no_warm_up": {"warm_up": False},
    # Every engine option of GPU_DEFAULTS that is off by default, together (but MEASURED_IN_PARTS).
    "all_unmeasured": {
        "triton_fused_linear": True,
        "triton_tiled_linear": True,
        "triton_decode_rotary": True,
        "triton_moe": True,  # acts on mixtures of experts only (the qwen3_30b_a3b shape times it)
    },
    # The defaults before the H200 calls of 2026-11-30 switched on PDL, the fused sampler and the
    # kernel tunings of MODULE_PATCHES' entry below: the before, measured in the run of the after.
    "previous_defaults": {"triton_pdl": False, "triton_sampling": False},
    # The fused sampler's rows drawn by inverting the tempered softmax's CDF with one uniform a row
    # (sample/triton_inverse_cdf.py), not by the race's draw and two logarithms a token: the race
    # took 0.66-0.76 ms of a 256-sequence step on an H200. From every row count (MODULE_PATCHES):
    # the race's threshold of 128 rows was drawn for the race. Other tokens from the same seeds,
    # the same distribution; greedy tokens do not change.
    "inverse_cdf_sampler": {"fused_sampler": "inverse_cdf"},
    # The mixture of experts' routed experts on the Triton grouped matmul, decode in CUDA graphs
    # (its default engine runs the torch experts, eagerly).
    "triton_moe": {"triton_moe": True},
    # The projections as 8-bit floats with a scale per output row, made at load (layers/quantized.py):
    # half the weight bytes a decode step reads. Another model's numbers, so its greedy tokens
    # need not equal the default's; its floors are still the 16-bit model's (a fraction of one
    # above 1 is possible).
    "fp8": {"quantization": "fp8"},
    # An 8-bit float KV cache (attention/kv_dtype.py): half the bytes decode attention reads, which
    # are most of the workload's. Its keys and values are rounded, so its tokens need not equal the
    # default's; its floors are the 16-bit cache's.
    "kv_fp8": {"kv_cache_dtype": "fp8"},
    # The shape as an AWQ checkpoint (``VARIANT_CHECKPOINTS``): 4-bit weights packed in int32 words
    # with a scale and a zero point per 128 input columns, a quarter of the 16-bit bytes a batch-1
    # step reads, which the skinny matmul unpacks as it loads them. Floors as for ``fp8``.
    "awq": {},
}
# Variants that are another checkpoint of the shape: the ``quantization_config`` their folder's
# config.json carries (random weights in its layout, ``models/loader.py:quantize_projections``).
VARIANT_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
}
# Variants that set a kernel module's constant, not an engine option, for their measurement only:
# tunings the engine does not expose. ``split_32`` lets 32-token parts of a context run in
# parallel (default 64): one sequence's contexts of 64 to 127 tokens split too.
MODULE_PATCHES: dict[str, dict[tuple[str, str], Any]] = {
    # PDL with the skinny matmul's L2 prefetch of its weights before the wait (up to 16 MiB).
    "pdl_prefetch": {("inferd.layers.triton_linear", "PREFETCH_MAX_BYTES"): 16 * 2**20},
    "split_32": {("inferd.attention.triton_kernels", "_MIN_TOKENS_PER_SPLIT"): 32},
    # 8 decode programs per SM before splitting, not 4: on an H200 the split sweep's 32 and 64
    # sequences of 900-2,047 tokens ran fastest split 8 ways in the second call of 2026-11-30.
    "split_mid_8": {("inferd.attention.triton_kernels", "_DECODE_PROGRAMS_PER_SM"): 8},
    # Every step's temperature-only rows to the inverse-CDF kernel, however few (the sampler part
    # times it at 1, 64 and 256 rows against the torch race for where the threshold should sit).
    "inverse_cdf_sampler": {("inferd.sample.sampler", "FUSED_MIN_ROWS"): 1},
    "previous_defaults": {
        ("inferd.attention.triton_kernels", "_MIN_TOKENS_PER_SPLIT"): 256,
        ("inferd.attention.triton_kernels", "_DECODE_PROGRAMS_PER_SM"): 1,
        ("inferd.attention.triton_kernels", "_DECODE_HEADS_FIRST"): False,
        ("inferd.attention.triton_kernels", "_DECODE_NUM_STAGES"): 3,
        ("inferd.layers.triton_linear", "PREFETCH_MAX_BYTES"): 16 * 2**20,
    },
}
# Options a CPU engine refuses: the smoke run leaves them out, so their variants run the same code
# as the default there.
GPU_ONLY_OPTIONS = ("triton_pdl",)
# The engine a failed default run falls back to: each GPU-only feature off (``fallback_options``
# adds those a device call's figures switched on in GPU_DEFAULTS).
FALLBACK = {"enforce_eager": True, "async_scheduling": False, "warm_up": False}


def smoke_options() -> dict[str, Any]:
    """A GPU's defaults that the CPU leaves off, GPU_DEFAULTS' switched-on features among them:
    the smoke run asks for them, so it goes through the same paths (the small ops and the fused
    sampler through the Triton interpreter), but for the options a CPU engine refuses."""
    from inferd.config import GPU_DEFAULTS

    table = {option: True for option, on in GPU_DEFAULTS.items() if on and option not in GPU_ONLY_OPTIONS}
    return {"triton_ops": True, "async_scheduling": True, "warm_up": True, **table}


def fallback_options() -> dict[str, Any]:
    """``FALLBACK`` with every feature of ``GPU_DEFAULTS`` off."""
    from inferd.config import GPU_DEFAULTS

    return {**FALLBACK, **dict.fromkeys(GPU_DEFAULTS, False)}


# Runs of the workload on the default engine, the first and repeats on other token ids. On an H200
# two runs of one engine differed by up to 3.7% (2026-11-30), more than some variants' gains: the
# median of three is the default's steadier figure.
WORKLOAD_RUNS = 3

# Seconds after which a GPU run starts no new part, unless --budget-s says otherwise.
DEFAULT_BUDGET_S = 420.0


class Budget:
    """The run's wall-clock budget: a part that would start after it is spent is skipped, so the
    JSON is written before the device call's own time limit ends the process."""

    deadline = float("inf")

    def spent(self) -> bool:
        return time.perf_counter() > self.deadline


BUDGET = Budget()


def attempt(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    """Run one part of the benchmark; a failure is recorded under ``name`` and the run goes on,
    so one broken part never costs the numbers of the others (a device call is precious)."""
    if BUDGET.spent():
        results[name] = {"skipped": "the --budget-s time was spent"}
        print(f"{name} skipped: out of time", flush=True)
        return None
    try:
        value = fn()
    except Exception:
        results[name] = {"error": traceback.format_exc(limit=8)}
        print(f"{name} FAILED:\n{results[name]['error']}", flush=True)
    else:
        results[name] = value
        return value
    free_device_memory()  # after the except block, whose traceback held the failed frames
    return None


def out_of_time(results: list[dict[str, Any]]) -> bool:
    """Whether a sweep must stop before its next case, the budget being spent; the sweep's list
    then ends with a note of it. A sweep's cases take seconds each, its whole a minute or more."""
    if not BUDGET.spent():
        return False
    results.append({"skipped": "the --budget-s time was spent; later cases not run"})
    print("sweep stopped: out of time", flush=True)
    return True


def switch_off_pdl() -> None:
    """Programmatic dependent launch is a process-wide switch an engine leaves as it set it; the
    sweeps call kernels directly and must time them as the default engine launches them."""
    module = sys.modules.get("inferd.layers.triton_pdl")
    if module is not None:
        module.set_enabled(False)


def start_engine(
    folder: Path, plan: Plan, args: argparse.Namespace, options: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """An engine and its start-up facts: build seconds and the CUDA graphs captured."""
    start = time.perf_counter()
    llm = inferd_engine(folder, plan, args.backend, {**options, **args.engine_option})
    _sync()
    graphs = llm.engine.core.runner.graphs
    startup = {
        "build_s": time.perf_counter() - start,
        "cuda_graphs": graphs is not None,
        "graph_capture_s": graphs.capture_seconds if graphs is not None else None,
        "graph_batch_sizes": graphs.batch_sizes if graphs is not None else [],
        # Context tiers per batch size, where a size has more than one (split graphs for long contexts).
        "graph_context_tiers": {size: t for size, t in graphs.tiers.items() if len(t) > 1} if graphs else {},
        "triton_ops": llm.engine.config.uses_triton_ops,
        "triton_linear": llm.engine.config.uses_triton_linear,
        "triton_sampling": llm.engine.config.uses_triton_sampling,
        "triton_fused_linear": llm.engine.config.uses_triton_fused_linear,
        "triton_tiled_linear": llm.engine.config.uses_triton_tiled_linear,
        "triton_pdl": llm.engine.config.uses_triton_pdl,
        "triton_decode_rotary": llm.engine.config.uses_triton_decode_rotary,
        "triton_moe": llm.engine.config.uses_triton_moe,
        "warm_up": _warm_up_facts(llm.engine.core.runner.warm_up_report),
    }
    print("engine start-up:", json.dumps(startup), flush=True)
    return llm, startup


def _warm_up_facts(report: WarmUpReport | None) -> dict[str, Any] | None:
    """The engine's start-up warm-up (``worker/warm_up.py``): its steps and seconds; None when off."""
    if report is None:
        return None
    shape = report.shape
    return {"seconds": report.seconds, "prompts": shape.num_seqs, "prompt_tokens": shape.prompt_tokens,
            "decode_step": shape.decodes, "short_prompts": list(shape.short_prompts),
            "sampling_passes": report.sampling_passes, "sampling_rows": shape.sampling_rows}  # fmt: skip


def profile_decode(llm: Any, plan: Plan, batch: int) -> dict[str, Any]:
    """The kernels (or, on the CPU, ops) that take the most time over a short decode run."""
    from torch.profiler import ProfilerActivity, profile

    from inferd.sampling_params import SamplingParams

    on_gpu = plan.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    prompt_len = min(64, plan.max_prompt_len)
    prompts = [[(7 * i + j) % plan.token_id_limit for j in range(prompt_len)] for i in range(batch)]
    params = SamplingParams(max_tokens=min(32, plan.max_output_len), temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))
    _sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        llm.generate(prompts, params)
        _sync()
        wall = time.perf_counter() - start
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total_us = sum(getattr(e, key) for e in events) or 1
    top = [
        {
            "name": e.key[:120],
            "calls": e.count,
            "ms": getattr(e, key) / 1e3,
            "share": getattr(e, key) / total_us,
        }
        for e in events[:15]
    ]
    print(f"profile, batch {batch} ({'device' if on_gpu else 'cpu'} time):", flush=True)
    for row in top:
        print(f"  {row['ms']:9.2f} ms {row['share']:6.1%} x{row['calls']:<6} {row['name']}", flush=True)
    return {"batch": batch, "wall_s": wall, "busy_ms": total_us / 1e3, "time": key, "top": top}


def batch1(llm: Any, plan: Plan, shape: ModelShape, ceilings: Ceilings) -> dict[str, float]:
    measured = run_inferd_batch1(llm, plan)
    # Measured from the first token on, so the floor leaves the prefill out too.
    floor_s = decode_floor_s(shape, [BATCH1_PROMPT_LEN], [plan.decode_tokens], ceilings)
    measured["floor_tok_s"] = (plan.decode_tokens - 1) / floor_s
    measured["fraction_of_floor"] = measured["decode_tok_s"] / measured["floor_tok_s"]
    print("batch-1 decode:", json.dumps(measured), flush=True)
    return measured


@contextlib.contextmanager
def patched_modules(patches: dict[tuple[str, str], Any]) -> Iterator[None]:
    """Set module attributes for the duration of the block, then restore them."""
    saved = []
    try:
        for (module_name, attr), value in patches.items():
            module = importlib.import_module(module_name)
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, value)
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


class ShapeRun:
    """Everything timed on one model shape; variants run in the order ``main`` asks for them."""

    def __init__(
        self,
        args: argparse.Namespace,
        plan: Plan,
        ceilings: Ceilings,
        folder: Path,
        hf_config: dict[str, Any],
        base_options: dict[str, Any],
    ) -> None:
        self.args, self.plan, self.ceilings = args, plan, ceilings
        self.hf_config = hf_config
        self.folder = write_model_folder(folder, hf_config)
        self.shape = model_shape(hf_config, plan.dtype)
        self.base_options = {**base_options, **(smoke_options() if args.smoke else {})}
        self.result: dict[str, Any] = {"variants": {}}
        self.reference_tokens: GreedyRun | None = None  # the default engine's greedy tokens

    def variant(self, name: str, workload: bool = False, profile: bool = False) -> None:
        """Time one engine variant. The default's workload figure is the headline (kept at the top
        of the shape's results); another variant's stays in its own entry."""
        entry: dict[str, Any] = {"options": VARIANTS[name]}
        patches = MODULE_PATCHES.get(name, {})
        if patches:
            entry["module_patches"] = {f"{module}.{attr}": value for (module, attr), value in patches.items()}
        self.result["variants"][name] = entry
        options = {**self.base_options, **VARIANTS[name]}
        if self.args.smoke:
            left_out = [option for option in GPU_ONLY_OPTIONS if options.pop(option, False)]
            if left_out:
                entry["left_out_on_cpu"] = left_out
        home = self.result if name == "default" else entry
        # (A checkpoint variant's folder is written only for it.)
        folder = self.variant_folder(name) if name in VARIANT_CHECKPOINTS else None
        with patched_modules(patches):
            try:
                self._measure(entry, "startup", options, workload, profile, home, folder=folder)
            finally:
                switch_off_pdl()
        failed = [entry.get("startup", {}), home.get("nano_vllm_inferd", {})]
        if name == "default" and workload and any("error" in part for part in failed):
            # Without the workload figure the call is wasted: once more on the plainest engine, marked.
            if "error" in home.get("nano_vllm_inferd", {}):
                entry["workload_error"] = home.pop("nano_vllm_inferd")
            plain = {**options, **fallback_options()}
            self._measure(
                entry, "fallback_startup", plain, workload, profile, home, label="eager sync fallback"
            )
        if name == "default":
            self.result["batch1_decode"] = entry.get("batch1_decode")

    def variant_folder(self, name: str) -> Path:
        """The model folder variant ``name`` runs on: the shape's own, or for a checkpoint variant
        (``VARIANT_CHECKPOINTS``) one beside it whose config.json carries its quantization."""
        if name not in VARIANT_CHECKPOINTS:
            return self.folder
        quantized_config = {**self.hf_config, "quantization_config": VARIANT_CHECKPOINTS[name]}
        return write_model_folder(self.folder.with_name(f"{self.folder.name}-{name}"), quantized_config)

    def _measure(
        self,
        entry: dict[str, Any],
        startup_key: str,
        options: dict[str, Any],
        workload: bool,
        profile: bool,
        home: dict[str, Any],
        label: str | None = None,
        folder: Path | None = None,
    ) -> None:
        """Start an engine (on ``folder``, the shape's own by default), take its figures, release
        it. If the workload fails, the engine is dropped at once: it may hold half-done requests
        that would run inside the next figure."""
        model = folder or self.folder
        engine = attempt(entry, startup_key, lambda: start_engine(model, self.plan, self.args, options))
        if engine is None:
            return
        llm, entry[startup_key] = engine
        del engine
        ok = True
        if workload:
            run = functools.partial(self._workload, llm, again=home is self.result)
            ok = attempt(home, "nano_vllm_inferd", run) is not None
        if ok:
            attempt(
                entry, "batch1_decode", functools.partial(batch1, llm, self.plan, self.shape, self.ceilings)
            )
            for batch in (1, min(64, self.plan.num_seqs)) if profile else ():
                attempt(
                    entry, f"profile_batch{batch}", functools.partial(profile_decode, llm, self.plan, batch)
                )
            # After the timed parts, whose compiles and caches stay as in earlier runs.
            attempt(entry, "greedy_agreement", functools.partial(self._agreement, llm, home is self.result))
        del llm  # nothing else may hold the engine (48 GiB of KV) into the next measurement
        free_device_memory()
        if label is not None:
            for measured in (home.get("nano_vllm_inferd"), entry.get("batch1_decode")):
                if isinstance(measured, dict):
                    measured["engine"] = label

    def _agreement(self, llm: Any, reference: bool) -> dict[str, Any]:
        """The default engine's greedy tokens are the reference (``reference``); another engine's
        are compared with them, so a variant's speed is never read without knowing that it still
        computes the same model (every engine of a shape has the same seeded random weights)."""
        run = greedy_tokens(llm, self.plan)
        if reference:
            self.reference_tokens = run
            return {"reference": True, "prompts": len(run)}
        if self.reference_tokens is None:
            return {"skipped": "no reference: the default engine's greedy run is missing"}
        return greedy_agreement(run, self.reference_tokens)

    def _workload(self, llm: Any, again: bool = False) -> dict[str, Any]:
        """The workload's figures; with ``again``, ``WORKLOAD_RUNS - 1`` more runs on the same
        engine are recorded too (``repeat_runs``), with the median of all (``median_output_tok_s``):
        what the first run still spends on kernels the warm-up did not reach, and the figure least
        moved by the run-to-run spread."""
        prompts, output_lens = nano_vllm_workload(self.plan)
        step_floor = functools.partial(step_floor_s, self.shape, ceilings=self.ceilings)
        measured = run_inferd_workload(llm, prompts, output_lens, step_floor)
        if again:
            repeats = []
            for shift in range(1, WORKLOAD_RUNS):
                # Other token ids, same lengths: the prefix cache must not serve repeated prompts.
                shifted = [[(t + shift) % self.plan.token_id_limit for t in prompt] for prompt in prompts]
                repeats.append(run_inferd_workload(llm, shifted, output_lens, step_floor))
            measured["repeat_runs"] = repeats
            rates = [measured["output_tok_s"], *(run["output_tok_s"] for run in repeats)]
            measured["median_output_tok_s"] = statistics.median(rates)
        floor_s = generation_floor_s(self.shape, [len(p) for p in prompts], output_lens, self.ceilings)
        measured["floor_tok_s"] = sum(output_lens) / floor_s
        measured["fraction_of_floor"] = measured["output_tok_s"] / measured["floor_tok_s"]
        print("nano-vllm workload, inferd:", json.dumps(measured), flush=True)
        return measured

    def checks(self) -> None:
        checks: dict[str, Any] = {}
        self.result["checks"] = checks  # recorded as it fills: a fault in it keeps what was found
        attempt(checks, "kernels", lambda: check_kernels(self.hf_config, self.plan))
        attempt(checks, "model_forward", lambda: check_model_forward(self.folder, self.hf_config, self.plan))
        print("relative error, triton vs torch:", json.dumps(checks), flush=True)

    def decode_sweep(self) -> None:
        attempt(
            self.result,
            "decode_kernel_sweep",
            lambda: sweep_decode_kernel(self.hf_config, self.plan, self.ceilings),
        )

    def sampler_timing(self) -> None:
        attempt(self.result, "sampler", lambda: time_sampler(self.hf_config, self.plan))

    def split_sweep(self) -> None:
        attempt(self.result, "decode_split_sweep", lambda: sweep_decode_splits(self.hf_config, self.plan))

    def linear_sweep(self) -> None:
        attempt(self.result, "skinny_linear_sweep", lambda: sweep_skinny_linear(self.plan, self.ceilings))

    def fused_input_sweep(self) -> None:
        attempt(self.result, "fused_input_sweep", lambda: sweep_fused_inputs(self.plan, self.ceilings))

    def tiled_sweep(self) -> None:
        attempt(self.result, "tiled_linear_sweep", lambda: sweep_tiled_linear(self.plan, self.ceilings))

    def compare_with_transformers(self) -> None:
        """transformers' figure on the workload (this run's or the committed one) and the ratio."""
        if self.args.skip_transformers:
            peer: Any = dict(TRANSFORMERS_H200_REFERENCE)
        else:
            prompts, output_lens = nano_vllm_workload(self.plan)
            run = functools.partial(
                run_transformers_workload, self.hf_config, self.plan, prompts, output_lens
            )
            holder: dict[str, Any] = {}
            peer = attempt(holder, "transformers", run) or holder["transformers"]
        self.record_workload_comparison(peer)

    def record_workload_comparison(self, peer: dict[str, Any]) -> None:
        """The workload's headline entry: inferd's figure beside transformers' (``peer``)."""
        print("nano-vllm workload, transformers:", json.dumps(peer), flush=True)
        ours = self.result.pop("nano_vllm_inferd", None)
        if isinstance(ours, dict) and "output_tok_s" in ours and "output_tok_s" in peer:
            ours["ratio_to_transformers"] = ours["output_tok_s"] / peer["output_tok_s"]
        self.result["nano_vllm_workload"] = {"inferd": ours, "transformers": peer}


def write_partial(args: argparse.Namespace, checkpoint: Checkpoint) -> None:
    """What is known so far (the checkpoint's results), in case the call runs out of time."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = {**checkpoint.results, "device_lost_in": checkpoint.lost}
    args.out.with_suffix(".partial.json").write_text(json.dumps(partial, indent=2, default=str))


def shape_runs(args: argparse.Namespace, plan: Plan, ceilings: Ceilings, root: Path) -> dict[str, ShapeRun]:
    """The model shapes timed, each with its model folder under ``root``: the two of the issue's
    targets and the mixture of experts, or (``--moe-only``) the mixture of experts alone."""
    moe = ShapeRun(
        args, plan, ceilings, root / "qwen3-30b-a3b", shape_config(QWEN3_30B_A3B, args.smoke),
        {"max_num_seqs": 1, "kv_cache_memory": "4GiB" if not args.smoke else plan.kv_cache_memory},
    )  # fmt: skip
    if args.moe_only:
        return {"qwen3_30b_a3b": moe}
    qwen = ShapeRun(args, plan, ceilings, root / "qwen3-0.6b", shape_config(QWEN3_0_6B, args.smoke), {})
    # One sequence needs little KV cache; a small budget keeps the 8B run within an 80 GB card.
    llama_kv = "4GiB" if not args.smoke else plan.kv_cache_memory
    llama = ShapeRun(
        args, plan, ceilings, root / "llama-3.1-8b", shape_config(LLAMA_3_1_8B, args.smoke),
        {"max_num_seqs": 1, "kv_cache_memory": llama_kv},
    )  # fmt: skip
    return {"qwen3_0.6b": qwen, "llama_3.1_8b": llama, "qwen3_30b_a3b": moe}


def planned_steps(runs: dict[str, ShapeRun]) -> list[Callable[[], None]]:
    """The target figures first (workload, batch-1 with graphs on both shapes), then the variants
    that explain them, so a short budget loses the explanations, not the targets; the mixture of
    experts last."""
    moe = runs["qwen3_30b_a3b"]
    moe_steps = [functools.partial(moe.variant, "default"), functools.partial(moe.variant, "triton_moe")]
    if "qwen3_0.6b" not in runs:  # --moe-only
        return moe_steps
    qwen, llama = runs["qwen3_0.6b"], runs["llama_3.1_8b"]
    return [
        qwen.checks,
        functools.partial(qwen.variant, "default", workload=True),
        functools.partial(llama.variant, "default"),
        # The same engines on the defaults before the last device call switched some on: the
        # before and after of that change in one run.
        functools.partial(qwen.variant, "previous_defaults", workload=True),
        functools.partial(llama.variant, "previous_defaults"),
        # The sampler kernel that should take most of a full-batch step's sampling time off, and
        # the samplers alone by row count (a few seconds): where its threshold should sit.
        functools.partial(qwen.variant, "inverse_cdf_sampler", workload=True),
        qwen.sampler_timing,
        # The features that are still off, one that the batch-1 target needs first, then all of
        # them together: the figures the defaults would give if all were switched on.
        functools.partial(qwen.variant, "fused_linear"),
        functools.partial(llama.variant, "fused_linear"),
        functools.partial(qwen.variant, "all_unmeasured", workload=True),
        functools.partial(llama.variant, "all_unmeasured"),
        # 8-bit float weights: batch-1 decode reads half the bytes.
        functools.partial(llama.variant, "fp8"),
        functools.partial(qwen.variant, "fp8", workload=True),
        functools.partial(qwen.variant, "kv_fp8", workload=True),
        # 4-bit weights with zero points, as AWQ and GPTQ checkpoints hold them.
        functools.partial(llama.variant, "awq"),
        functools.partial(qwen.variant, "awq"),
        functools.partial(qwen.variant, "split_32"),
        functools.partial(qwen.variant, "decode_rotary", workload=True),
        functools.partial(qwen.variant, "split_mid_8", workload=True),
        # The kernels behind the attention variants and the sampler's threshold, alone: short,
        # and what says which decode tile, launch order, split and threshold to keep.
        qwen.decode_sweep,
        qwen.split_sweep,
        qwen.fused_input_sweep,
        functools.partial(qwen.variant, "pdl_prefetch"),
        functools.partial(qwen.variant, "tiled_linear", workload=True),
        functools.partial(qwen.variant, "no_warm_up", workload=True),
        qwen.tiled_sweep,
        qwen.linear_sweep,
        functools.partial(qwen.variant, "cublas_linear", workload=True),
        functools.partial(llama.variant, "cublas_linear"),
        functools.partial(qwen.variant, "sync", workload=True),
        functools.partial(qwen.variant, "eager", profile=True),
        functools.partial(qwen.variant, "eager_torch_ops"),
        functools.partial(llama.variant, "eager"),
        qwen.compare_with_transformers,
        *moe_steps,
    ]


def step_name(step: Callable[[], None], runs: dict[str, ShapeRun]) -> str:
    """A step as the JSON names it, e.g. ``qwen3_0.6b variant all_unmeasured``."""
    call = step.func if isinstance(step, functools.partial) else step
    owner = next((name for name, run in runs.items() if getattr(call, "__self__", None) is run), "?")
    arguments = [a for a in step.args if isinstance(a, str)] if isinstance(step, functools.partial) else []
    return " ".join([owner, getattr(call, "__name__", "step"), *arguments])


def device_lost(plan: Plan) -> bool:
    """Whether a kernel fault (an illegal address, say) has broken the CUDA context. Such errors
    are sticky: each later call into CUDA raises them again, so a synchronize says it."""
    if plan.device != "cuda":
        return False
    try:
        torch.cuda.synchronize()
    except Exception:  # torch raises RuntimeError or its subclass AcceleratorError
        return True
    return False


# A kernel fault breaks the process's CUDA context for good, and torch may even abort the process
# as it frees memory. So the benchmark runs in a child process that keeps a checkpoint of where
# it is (``<out>.resume.json``): the step it starts, then the results once the step is done. When a
# child ends otherwise than in success or a Python error (it found its device lost and exited with
# EXIT_DEVICE_LOST, or a signal ended it), the parent records the step it was in as lost and a
# fresh child goes on from the next one (``--resume``), at most MAX_RESUMES times; after that, a
# last child only writes the results.
MAX_RESUMES = 3
EXIT_DEVICE_LOST = 75


@dataclass
class Checkpoint:
    """Where a child is: the next step to run, the results so far and what later steps need."""

    next_step: int
    ceilings: Ceilings
    results: dict[str, Any]
    reference_tokens: dict[str, Any]
    running: str | None = None  # the step started and not finished
    lost: list[dict[str, str]] = dataclasses.field(default_factory=list)  # {"step", "error"}
    stop: bool = False  # the device was lost too often: no more steps

    def capture(self, runs: dict[str, ShapeRun]) -> None:
        self.results = {name: run.result for name, run in runs.items()}
        self.reference_tokens = {name: run.reference_tokens for name, run in runs.items()}

    def restore(self, runs: dict[str, ShapeRun]) -> None:
        for name, run in runs.items():
            run.result = self.results[name]
            run.reference_tokens = self.reference_tokens[name]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), default=str))

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        state = json.loads(path.read_text())
        state["ceilings"] = Ceilings(**state["ceilings"])
        return cls(**state)


def run_all(args: argparse.Namespace, plan: Plan, runs: dict[str, ShapeRun], checkpoint: Checkpoint) -> bool:
    """The planned steps from the checkpoint's next one; False when one lost the device (the
    checkpoint then says which, and where to go on)."""
    path = args.out.with_suffix(".resume.json")
    steps = planned_steps(runs)
    for index in range(len(steps) if checkpoint.stop else checkpoint.next_step, len(steps)):
        checkpoint.running = step_name(steps[index], runs)
        checkpoint.save(path)
        error = None
        try:
            steps[index]()
        except Exception as exc:
            # A part's own failure is recorded where it happened; what escapes it is the cleanup
            # after a kernel fault, which the check below hands to a fresh process.
            if not device_lost(plan):
                raise
            traceback.print_exc()
            error = f"{type(exc).__name__}: {exc}"[:500]
        lost = error is not None or device_lost(plan)
        if lost:
            checkpoint.lost.append({"step": checkpoint.running, "error": error or "the CUDA context broke"})
        checkpoint.capture(runs)
        checkpoint.next_step, checkpoint.running = index + 1, None
        checkpoint.save(path)
        write_partial(args, checkpoint)
        if lost:
            print(f"the device was lost in {checkpoint.lost[-1]['step']}", flush=True)
            return False
    return True


def parse_engine_option(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--smoke", action="store_true", help="toy shapes on the CPU, to check the script")
    reference = TRANSFORMERS_H200_REFERENCE["output_tok_s"]
    parser.add_argument(
        "--skip-transformers",
        action="store_true",
        help=f"reuse transformers' H200 figure ({reference} tok/s), not a 215 s run",
    )
    parser.add_argument("--backend", default="triton", help="attention backend timed: triton or torch")
    parser.add_argument("--kv-cache-memory", default="48GiB", help="KV cache budget per engine")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="parts that would start after this many seconds are skipped (results kept); "
        f"default {DEFAULT_BUDGET_S:.0f} on a GPU, none with --smoke, which checks every part",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="go on from a run whose device was lost (the script passes this to its child)",
    )
    parser.add_argument(
        "--started-at",
        type=float,
        default=None,
        help="when the run started, in seconds since the epoch (the script passes this to its child)",
    )
    parser.add_argument(
        "--child",
        action="store_true",
        help="run the benchmark in this process (the script's own child); without it, a parent "
        "process runs it in a child and starts a fresh child if the device is lost",
    )
    parser.add_argument(
        "--moe-only",
        action="store_true",
        help="time only the mixture of experts (Qwen3-30B-A3B shape, batch 1): torch experts "
        "against triton_moe, for a call of its own",
    )
    parser.add_argument(
        "--engine-option",
        type=parse_engine_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra inferd engine option, e.g. block_size=32",
    )
    args = parser.parse_args(argv)
    args.engine_option = dict(args.engine_option)
    return args


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(arguments)
    return run_benchmark(args) if args.child else supervise(arguments, args.out)


def supervise(arguments: list[str], out: Path) -> int:
    """Run the benchmark in child processes (see ``Checkpoint``): this process never touches the
    device, so nothing it holds is lost with it."""
    path = out.with_suffix(".resume.json")
    path.unlink(missing_ok=True)
    resume: list[str] = []
    status = 0
    for _ in range(MAX_RESUMES + 2):  # the first child, its resumptions, one that only writes
        status = run_child([*arguments, "--child", "--started-at", repr(PROCESS_STARTED_AT), *resume])
        if status == 0:
            path.unlink(missing_ok=True)
            return status
        if status == 1 or not path.exists():
            return status  # an error in this script, which a fresh process would repeat
        checkpoint = Checkpoint.load(path)
        why = f"signal {-status}" if status < 0 else f"exit status {status}"
        if checkpoint.running is not None:  # it died inside a step
            checkpoint.lost.append({"step": checkpoint.running, "error": f"the process ended: {why}"})
            checkpoint.next_step, checkpoint.running = checkpoint.next_step + 1, None
        checkpoint.stop = len(checkpoint.lost) > MAX_RESUMES
        checkpoint.save(path)
        print(f"the benchmark's process ended ({why}): a fresh one goes on from step {checkpoint.next_step}",
              flush=True)  # fmt: skip
        resume = ["--resume", str(path)]
    return status


def run_child(arguments: list[str]) -> int:
    return subprocess.call([sys.executable, sys.argv[0], *arguments])


# Options the parent gives its child, with how many values each takes.
CHILD_OPTIONS = {"--child": 0, "--started-at": 1, "--resume": 1}


def as_typed(argv: list[str]) -> list[str]:
    """A child's command line as the parent's was typed."""
    typed: list[str] = []
    skip = 0
    for arg in argv:
        if skip:
            skip -= 1
        elif arg in CHILD_OPTIONS:
            skip = CHILD_OPTIONS[arg]
        else:
            typed.append(arg)
    return typed


def run_benchmark(args: argparse.Namespace) -> int:
    """The benchmark itself, in this process; ``EXIT_DEVICE_LOST`` when a step lost the device."""
    plan = Plan.for_args(args)
    started_at = args.started_at if args.started_at is not None else PROCESS_STARTED_AT
    started = time.perf_counter() - (time.time() - started_at)
    budget_s = args.budget_s if args.budget_s is not None else (math.inf if args.smoke else DEFAULT_BUDGET_S)
    BUDGET.deadline = started + budget_s
    checkpoint = Checkpoint.load(args.resume) if args.resume is not None else None
    ceilings = checkpoint.ceilings if checkpoint else measure_ceilings(plan)
    print(f"device {device_name(plan)}: copy {ceilings.bandwidth_bytes_s / 1e9:.0f} GB/s, "
          f"matmul {ceilings.matmul_flops_s / 1e12:.2f} TFLOP/s", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        runs = shape_runs(args, plan, ceilings, Path(tmp))
        if checkpoint is None:
            checkpoint = Checkpoint(0, ceilings, {}, {})
        else:
            checkpoint.restore(runs)
        if not run_all(args, plan, runs, checkpoint):
            return EXIT_DEVICE_LOST
    qwen = runs.get("qwen3_0.6b")
    # Its step never ran: the device was lost too often.
    if qwen is not None and "nano_vllm_workload" not in qwen.result:
        peer = dict(TRANSFORMERS_H200_REFERENCE) if args.skip_transformers else {"skipped": "not run"}
        qwen.record_workload_comparison(peer)
    results = {
        "device": device_name(plan),
        "torch": torch.__version__,
        "command": " ".join(["python", *as_typed(sys.argv)]),
        "smoke": args.smoke,
        "attention_backend": args.backend,
        "engine_options": args.engine_option,
        "ceilings": asdict(ceilings),
        **{name: run.result for name, run in runs.items()},
        "device_lost_in": checkpoint.lost,
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_summary(results)
    print(f"wrote {args.out} after {results['wall_seconds']:.0f} s")
    return 0


def print_summary(results: dict[str, Any]) -> None:
    """The figures against the default; ``results`` may be partial (``<out>.partial.json``, from a
    run that ran out of time), so any part may be missing."""
    for lost in results.get("device_lost_in", []):
        print(f"device lost in {lost['step']}: {lost['error']}")
    workload = results.get("qwen3_0.6b", {}).get("nano_vllm_workload", {})
    ours, peer = workload.get("inferd"), workload.get("transformers", {})
    if isinstance(ours, dict) and "output_tok_s" in ours:
        versus = (
            f", {ours['ratio_to_transformers']:.1f}x transformers ({peer['output_tok_s']:,.0f} tok/s, "
            f"{peer['source']})"
            if "ratio_to_transformers" in ours
            else ", transformers not measured"
        )
        engine = f" [{ours['engine']}]" if "engine" in ours else ""
        print(f"nano-vllm workload (Qwen3-0.6B shape){engine}: {ours['output_tok_s']:,.0f} output tok/s, "
              f"{ours['fraction_of_floor']:.1%} of the {ours['floor_tok_s']:,.0f} floor{versus}")  # fmt: skip
        # repeat_runs and a median since 2026-11-30; results files before it have one second_run.
        repeats = ours.get("repeat_runs") or ([ours["second_run"]] if "second_run" in ours else [])
        if repeats:
            again = " / ".join(f"{run['output_tok_s']:,.0f}" for run in repeats)
            line = f"nano-vllm workload, same engine again: {again} output tok/s"
            if "median_output_tok_s" in ours:
                line += f"; median of the {len(repeats) + 1} runs {ours['median_output_tok_s']:,.0f}"
            print(line)
        for kind, group in ours.get("steps", {}).items():
            host = 1e3 * group["host_launch_seconds"] / group["steps"]
            line = f"  steps {kind}: {group['steps']} x {group['ms_per_step']:.2f} ms"
            line += f" (host in launch {host:.2f} ms)"
            if "device_busy_fraction" in group:
                line += f", device busy {group['device_busy_fraction']:.0%}"
            if "fraction_of_floor" in group:
                line += f", {group['fraction_of_floor']:.0%} of its floor"
            print(line)
    elif "qwen3_0.6b" in results:  # not a --moe-only run
        print("nano-vllm workload: not measured (failed or out of time; see the JSON)")
    default_workload = ours.get("output_tok_s") if isinstance(ours, dict) else None
    for variant, entry in results.get("qwen3_0.6b", {}).get("variants", {}).items():
        other = entry.get("nano_vllm_inferd")
        if isinstance(other, dict) and "output_tok_s" in other:
            print(f"nano-vllm workload, {variant}: {other['output_tok_s']:,.0f} output tok/s"
                  f"{_against(other['output_tok_s'], default_workload)}{_agreement_note(entry)}")  # fmt: skip
    for name in ("qwen3_0.6b", "llama_3.1_8b", "qwen3_30b_a3b"):
        if name not in results:
            continue
        variants = results.get(name, {}).get("variants", {})
        default_b1 = variants.get("default", {}).get("batch1_decode")
        default_rate = default_b1.get("decode_tok_s") if isinstance(default_b1, dict) else None
        for variant, entry in variants.items():
            b1 = entry.get("batch1_decode")
            if isinstance(b1, dict) and "decode_tok_s" in b1:
                engine = f" [{b1['engine']}]" if "engine" in b1 else ""
                print(
                    f"batch-1 decode, {name}, {variant}{engine}: {b1['decode_tok_s']:,.0f} tok/s, "
                    f"{b1['fraction_of_floor']:.1%} of the {b1['floor_tok_s']:,.0f} floor"
                    f"{_against(b1['decode_tok_s'], None if variant == 'default' else default_rate)}"
                    f"{_agreement_note(entry)}"
                )
            else:
                print(f"batch-1 decode, {name}, {variant}: not measured (see the JSON)")


def _agreement_note(entry: dict[str, Any]) -> str:
    """A variant's greedy agreement with the default engine, for its summary lines."""
    agreement = entry.get("greedy_agreement")
    if not isinstance(agreement, dict) or "same_fraction" not in agreement:
        return ""
    largest = agreement["logprob_max_diff"]
    logprobs = "no token in common" if largest is None else f"within {largest:.3f}"
    return f", greedy tokens as the default's: {agreement['same_fraction']:.0%}, log-probabilities {logprobs}"


def _against(rate: float, default: float | None) -> str:
    """A variant's rate against the default engine's, as a signed percentage ("" without one)."""
    return f" ({rate / default - 1:+.1%} against the default)" if default else ""


if __name__ == "__main__":
    status = main()
    if status == EXIT_DEVICE_LOST:
        # Straight out: with a broken CUDA context, the interpreter's teardown (freeing device
        # memory) may abort the process and its exit status would say something else.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    raise SystemExit(status)
