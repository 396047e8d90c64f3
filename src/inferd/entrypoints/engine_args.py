"""Command-line flags for engine options, shared by every command that builds an engine."""

from __future__ import annotations

import argparse
from typing import Any

from inferd.config import GPU_DEFAULTS, GPU_NOT_YET_MEASURED
from inferd.sample.sampler import FUSED_KERNELS


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def positive_int(text: str) -> int:
    """An argparse type: refuses 0 and negatives with a usage error, not a traceback later."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number of at least 0."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a number of at least 0 (NaN refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


# Flag destinations that map one to one onto engine keyword options.
_DIRECT_OPTIONS = (
    "dtype",
    "device",
    "kv_cache_memory",
    "gpu_memory_utilization",
    "block_size",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "attention_backend",
    "tensor_parallel_size",
    "lora_modules",
    "speculative_config",
    "hf_overrides",
    "scheduling_policy",
    "long_prefill_token_threshold",
    "quantization",
    "kv_cache_dtype",
    "fused_sampler",
    "tokenizer",
)


def _default_on_a_gpu(feature: str) -> str:
    """The help's default for a speed feature, from what a GPU run measured (GPU_DEFAULTS)."""
    if GPU_DEFAULTS[feature]:
        return " (default: on for CUDA, where its kernels can run)"
    if feature in GPU_NOT_YET_MEASURED:
        return " (default: off until a GPU run measures it)"
    return " (default: off; H200 runs measured no consistent gain from it)"


# On/off engine options, each a --name / --no-name flag (unset: the engine's default), with its help.
_SWITCHES = {
    "async_scheduling": "launch each step before reading the last one's tokens, overlapping host and device "
    "work (default: on for CUDA, off on the CPU)",
    "triton_ops": "Triton kernels for RMSNorm (+ residual add), rotary with the KV store, SiLU-and-mul "
    "(default: on for CUDA)",
    "triton_linear": "the Triton matmul for projections of decode steps of one or two sequences "
    "(default: wherever --triton-ops is on)",
    "triton_fused_linear": "that matmul also applies the norm before a projection and SiLU-and-mul before "
    "the down projection" + _default_on_a_gpu("triton_fused_linear"),
    "triton_tiled_linear": "a Triton tensor-core matmul for wide projections of steps of up to 256 rows"
    + _default_on_a_gpu("triton_tiled_linear"),
    "triton_decode_rotary": "decode attention applies the rotary and q/k norms and stores the new K/V "
    "itself, one launch a layer fewer" + _default_on_a_gpu("triton_decode_rotary"),
    "triton_pdl": "launch the Triton kernels of the forward pass with programmatic dependent launch, each "
    "during the last one's tail, on Hopper GPUs and later" + _default_on_a_gpu("triton_pdl"),
    "triton_sampling": "random rows that only scale by a temperature are drawn by one fused Triton pass "
    "over the logits" + _default_on_a_gpu("triton_sampling"),
    "triton_moe": "a mixture of experts' routed experts on a Triton grouped matmul, without a host "
    "read per layer, so its decode steps can run as CUDA graphs" + _default_on_a_gpu("triton_moe"),
    "triton_penalties": "the repetition, presence and frequency penalties in one Triton pass over the "
    "penalized rows, reading the device's count tables once" + _default_on_a_gpu("triton_penalties"),
    "warm_up": "run the largest step, a decode step, short prompt steps and each sampling path once "
    "before serving, so the first requests pay no compiles and a step too large for memory fails at "
    "start-up (default: on for CUDA)",
}


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """The model folder, as the command's first argument or as vLLM's ``--model`` (``cli.py``
    merges the two)."""
    parser.add_argument("model", nargs="?", default=None, help="model folder; default: the built-in model")
    parser.add_argument("--model", dest="model_option", metavar="MODEL", help="the model folder, as vLLM's "
                        "--model names it (the same as the first argument)")  # fmt: skip


def add_engine_args(parser: argparse.ArgumentParser, seed_flag: bool = True) -> None:
    """``seed_flag=False`` leaves ``--seed`` to a command that uses it for something else."""
    group = parser.add_argument_group("engine (unset: the engine's defaults)")
    group.add_argument(
        "--dtype",
        choices=["auto", "float32", "float", "bfloat16", "float16", "half"],
        help="weights and KV dtype (auto, the default: the checkpoint's 16-bit dtype on a GPU, float32 on "
        "the CPU; float and half as vLLM spells float32 and float16)",
    )
    group.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    group.add_argument("--kv-cache-memory", help="KV cache budget, e.g. 2GiB (default: from free memory)")
    group.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="on a GPU, the share of its whole memory this engine may hold, e.g. 0.9 (vLLM's flag): the KV "
        "cache gets what that leaves after its weights (default: 85%% of what is free after loading)",
    )
    group.add_argument("--block-size", type=positive_int, help="tokens per KV block (default 16)")
    group.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "fp8", "fp8_e4m3"],
        help="fp8: the KV cache holds 8-bit floats (e4m3, values clamped to its range), twice the tokens "
        "in the same memory and half the bytes decode attention reads; auto: the model's dtype (default)",
    )
    group.add_argument("--max-model-len", type=positive_int, help="context limit (default: the model's)")
    group.add_argument("--max-num-seqs", type=positive_int, help="most sequences in one step (default 128)")
    group.add_argument("--max-num-batched-tokens", type=positive_int, help="token budget per step")
    group.add_argument(
        "--long-prefill-token-threshold",
        type=non_negative_int,
        help="most prompt tokens one request computes per step (vLLM's flag), so a long prompt shares its "
        "steps with the prompts behind it; 0: only the step's budget limits it (default)",
    )
    group.add_argument(
        "--scheduling-policy",
        choices=["fcfs", "priority"],
        help="fcfs: arrival order (default); priority: a request's 'priority' first (lower runs sooner; "
        "ties by arrival), also in who is preempted when KV blocks run out",
    )
    group.add_argument(
        "--no-prefix-caching",
        "--no-enable-prefix-caching",
        dest="no_prefix_caching",
        action="store_true",
        help="turn prefix caching off (the second spelling is vLLM's)",
    )
    group.add_argument(
        "--enable-prefix-caching",
        action="store_true",
        help="prefix caching on (vLLM's flag; it is the default here)",
    )
    group.add_argument(
        "--tokenizer",
        help="a folder with the tokenizer.json (and tokenizer_config.json) to use instead of the model's "
        "(vLLM's flag)",
    )
    group.add_argument("--attention-backend", choices=["auto", "torch", "triton"], help="attention kernels")
    group.add_argument(
        "--quantization",
        "-q",
        choices=["fp8"],
        help="fp8: store the checkpoint's 16- and 32-bit projections as 8-bit floats with one scale per "
        "output row, made at load (half the weight memory and the weight reads of small decode steps); "
        "a mixture's routed experts too; a low-bit checkpoint (FP8, W4A16, W8A16, W8A8, GPTQ, AWQ) is "
        "read as it is, with or without this",
    )
    group.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    group.add_argument(
        "--fused-sampler",
        choices=list(FUSED_KERNELS),
        help="the kernel of --triton-sampling: race (one random draw a token, the torch path's method; "
        "default) or inverse_cdf (one draw a row, inverted through the tempered softmax's running sum)",
    )
    for option, help_text in _SWITCHES.items():
        flag = "--" + option.replace("_", "-")
        group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
    group.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        help="split the model over this many processes (gloo on the CPU, NCCL with one GPU each; default 1)",
    )
    group.add_argument(
        "--lora-modules",
        nargs="+",
        metavar="NAME=FOLDER",
        help="LoRA adapters (PEFT folders) served beside the model, each asked for by its name (the "
        "OpenAI 'model' field, TGI's 'adapter_id')",
    )
    group.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help="let LoRA adapters be loaded and unloaded while serving (POST /v1/load_lora_adapter, "
        "/v1/unload_lora_adapter): adapter folders on this machine, named by API clients",
    )
    group.add_argument(
        "--speculative-config",
        metavar="JSON",
        help='speculative decoding by prompt lookup, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\': a decoding request proposes the tokens that '
        "followed the last occurrence of its last few tokens, and the model checks them in one step; or "
        'by a draft model of the same vocabulary: \'{"model": "/path/to/draft", "num_speculative_tokens": '
        "4}' (default: off)",
    )
    group.add_argument(
        "--hf-overrides",
        metavar="JSON",
        help="config.json fields to replace, as vLLM takes them; e.g. to serve Qwen3-Reranker as a "
        'cross-encoder: \'{"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": '
        '["no", "yes"], "is_original_qwen3_reranker": true}\'',
    )
    if seed_flag:
        group.add_argument("--seed", dest="engine_seed", type=int, help="seed for requests without their own")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine keyword options the flags asked for (unset ones are left to the engine)."""
    options = {name: getattr(args, name) for name in _DIRECT_OPTIONS if getattr(args, name) is not None}
    if getattr(args, "engine_seed", None) is not None:
        options["seed"] = args.engine_seed
    if args.enforce_eager:
        options["enforce_eager"] = True
    for switch in _SWITCHES:
        if getattr(args, switch) is not None:
            options[switch] = getattr(args, switch)
    if args.no_prefix_caching and args.enable_prefix_caching:
        raise ValueError("--enable-prefix-caching and --no-prefix-caching contradict each other")
    if args.no_prefix_caching:
        options["enable_prefix_caching"] = False
    if args.allow_runtime_lora_updating:
        options["allow_runtime_lora_updating"] = True
    return options
