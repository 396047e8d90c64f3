"""Engine options -> a resolved EngineConfig (model facts read, context and KV budget derived)."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from inferd.attention.registry import resolve_backend_name
from inferd.config import (
    DEFAULT_FUSED_SAMPLER,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ModelLoadError,
    SchedulerConfig,
    SpeculativeConfig,
    option_object,
    parse_dtype,
)
from inferd.kv.manager import kv_window
from inferd.models.loader import safetensors_files
from inferd.sample.sampler import FUSED_KERNELS
from inferd.sched.draft_proposer import read_draft_config

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
# The CPU KV cache takes this share of available RAM, capped, unless told otherwise.
_CPU_KV_FRACTION = 0.25
_CPU_KV_CAP = 8 * 2**30
# On a GPU, this share of the memory left after loading the weights.
_GPU_KV_FRACTION = 0.85
DEFAULT_MAX_NUM_SEQS = 128


def default_model_path() -> Path:
    return Path(str(resources.files("inferd") / "data" / "default_model"))


def parse_memory(value: str | int) -> int:
    """'4GiB', '512MiB', '2G', '1000000' -> bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", value.lower())
    if not match:
        raise ValueError(f"cannot read memory size {value!r}; use e.g. 4GiB, 512MiB or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


# Engine options that are counts: unset (None) means the default, and each must be at least 1.
_SIZES = ("max_model_len", "max_num_batched_tokens", "max_num_seqs", "block_size")


def _tokenizer_folder(value: str | Path | None) -> Path | None:
    """A tokenizer folder apart from the model's (vLLM's --tokenizer), checked now, not at first use."""
    if value is None:
        return None
    folder = Path(value)
    if not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(f"tokenizer folder {folder} has no tokenizer.json")
    return folder


def build_engine_config(model_path: str | Path | None = None, **options: Any) -> EngineConfig:
    path = Path(model_path) if model_path is not None else default_model_path()
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist")
    model = ModelConfig.from_folder(path, _hf_overrides(options.pop("hf_overrides", None)))
    device = options.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = options.pop("dtype", None)
    if dtype in (None, "auto"):  # vLLM's default's name
        dtype = _default_dtype(model, device)
    dtype = str(parse_dtype(dtype)).removeprefix("torch.")  # one name each ("half": float16)
    sizes = {name: options.pop(name, None) for name in _SIZES}
    for name, value in sizes.items():
        if value is not None and value < 1:  # 0 is a mistake to report, not "use the default"
            raise ValueError(f"{name} must be at least 1, got {value}")
    max_model_len = _resolve_max_model_len(model, sizes["max_model_len"])
    max_batched = sizes["max_num_batched_tokens"] or max(2048, min(max_model_len, 8192))
    scheduler = SchedulerConfig(
        max_num_seqs=sizes["max_num_seqs"] or DEFAULT_MAX_NUM_SEQS,
        max_num_batched_tokens=max_batched,
        max_model_len=max_model_len,
        max_tokens_cap=options.pop("max_tokens_cap", None),
        policy=options.pop("scheduling_policy", None) or "fcfs",
        long_prefill_token_threshold=options.pop("long_prefill_token_threshold", None) or 0,
    )
    kv_memory = options.pop("kv_cache_memory", None)
    utilization = options.pop("gpu_memory_utilization", None)
    if utilization is not None:
        if not 0 < float(utilization) <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
        if kv_memory is not None:
            raise ValueError("give kv_cache_memory or gpu_memory_utilization, not both")
        if not device.startswith("cuda"):
            raise ValueError("gpu_memory_utilization is a GPU's; on the CPU give kv_cache_memory")
    cache = CacheConfig(
        block_size=sizes["block_size"] or 16,
        kv_cache_memory=parse_memory(kv_memory) if kv_memory is not None else None,
        gpu_memory_utilization=float(utilization) if utilization is not None else None,
        num_blocks=options.pop("num_kv_blocks", None),
        enable_prefix_caching=options.pop("enable_prefix_caching", True),
    )
    config = EngineConfig(
        model_path=path,
        model=model,
        cache=cache,
        scheduler=scheduler,
        device=device,
        dtype=dtype,
        attention_backend=options.pop("attention_backend", None) or "auto",
        seed=options.pop("seed", None) or 0,
        load_format=options.pop("load_format", None) or "safetensors",
        quantization=options.pop("quantization", None),
        kv_cache_dtype=_kv_cache_dtype(options.pop("kv_cache_dtype", None)),
        enforce_eager=bool(options.pop("enforce_eager", False)),
        tokenizer=_tokenizer_folder(options.pop("tokenizer", None)),
        triton_ops=options.pop("triton_ops", None),
        triton_linear=options.pop("triton_linear", None),
        triton_fused_linear=options.pop("triton_fused_linear", None),
        triton_tiled_linear=options.pop("triton_tiled_linear", None),
        triton_decode_rotary=options.pop("triton_decode_rotary", None),
        triton_sampling=options.pop("triton_sampling", None),
        fused_sampler=_fused_sampler(options.pop("fused_sampler", None)),
        triton_pdl=options.pop("triton_pdl", None),
        triton_moe=options.pop("triton_moe", None),
        triton_penalties=options.pop("triton_penalties", None),
        async_scheduling=options.pop("async_scheduling", None),
        tensor_parallel_size=_tensor_parallel_size(options.pop("tensor_parallel_size", None), model),
        warm_up=options.pop("warm_up", None),
        lora_modules=_lora_modules(options.pop("lora_modules", None)),
        allow_runtime_lora_updating=bool(options.pop("allow_runtime_lora_updating", False)),
        speculative=_speculative(options.pop("speculative_config", None)),
    )
    if config.tensor_parallel_size > 1 and config.async_scheduling:
        raise ValueError("async_scheduling cannot be used with tensor parallelism (each step's inputs go "
                         "to the other ranks from the host)")  # fmt: skip
    if config.triton_fused_linear and not config.uses_triton_linear:
        raise ValueError("triton_fused_linear fuses ops into the Triton matmul: it needs triton_linear")
    if config.triton_decode_rotary and not (
        config.uses_triton_ops and resolve_backend_name(config.attention_backend, config.device) == "triton"
    ):
        raise ValueError("triton_decode_rotary moves the Triton rotary into Triton decode attention: "
                         "it needs triton_ops and the triton attention backend")  # fmt: skip
    if config.triton_pdl and not config.device.startswith("cuda"):
        raise ValueError(f"triton_pdl launches kernels on a CUDA GPU; the device is {config.device}")
    if config.triton_penalties and not (config.device.startswith("cuda") or _triton_interpreted()):
        raise ValueError("triton_penalties runs a Triton kernel on a CUDA GPU (or under Triton's "
                         f"interpreter, TRITON_INTERPRET=1); the device is {config.device}")  # fmt: skip
    if config.speculative is not None and config.speculative.method == "draft_model":
        if config.tensor_parallel_size > 1:
            raise ValueError("a draft model (speculative method draft_model) is not supported with tensor "
                             "parallelism")  # fmt: skip
        # Its folder is read now, so a draft that cannot serve fails before the engine loads.
        read_draft_config(Path(str(config.speculative.model)), model, max_model_len)
    if config.speculative is not None and config.async_scheduling:
        raise ValueError("speculative decoding cannot be used with async_scheduling: a request's next "
                         "tokens are proposed from its last one, which must be on the host")  # fmt: skip
    if config.uses_lora and config.tensor_parallel_size > 1:
        raise ValueError("LoRA adapters (lora_modules, allow_runtime_lora_updating) are not supported with "
                         "tensor parallelism")  # fmt: skip
    if config.quantization not in (None, "fp8"):
        raise ValueError(f"unknown quantization {config.quantization!r}; the engine makes fp8 weights")
    if config.kv_cache_dtype == "fp8" and _triton_stores_kv(config) and _capability(config.device) < (8, 9):
        raise ValueError("kv_cache_dtype fp8 through the Triton kernels (the triton attention backend, "
                         "triton_ops) needs compute capability 8.9 or later for Triton's e4m3; on this GPU "
                         "use attention_backend=torch and triton_ops=False")  # fmt: skip
    if config.load_format not in ("safetensors", "dummy"):
        raise ValueError(f"unknown load_format {config.load_format!r}; choose safetensors or dummy")
    if options:
        raise TypeError(f"unknown engine option(s): {', '.join(sorted(options))}")
    return config


def _triton_stores_kv(config: EngineConfig) -> bool:
    """Whether Triton kernels write or read the KV cache: the attention backend's, or the rotary
    kernel that stores K/V (triton_ops)."""
    backend = resolve_backend_name(config.attention_backend, config.device)
    return config.device.startswith("cuda") and (backend == "triton" or config.uses_triton_ops)


def _capability(device: str) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return major, minor


def _fused_sampler(value: str | None) -> str:
    """``fused_sampler``: the kernel of ``triton_sampling``, one of the sampler's ``FUSED_KERNELS``."""
    if value is None:
        return DEFAULT_FUSED_SAMPLER
    if value not in FUSED_KERNELS:
        raise ValueError(f"unknown fused_sampler {value!r}; choose one of {', '.join(FUSED_KERNELS)}")
    return value


def _kv_cache_dtype(value: str | None) -> str:
    """``kv_cache_dtype``: "auto" (the model's dtype) or "fp8" (e4m3; vLLM's "fp8_e4m3" too)."""
    if value in (None, "auto"):
        return "auto"
    if value in ("fp8", "fp8_e4m3"):
        return "fp8"
    raise ValueError(f"unknown kv_cache_dtype {value!r}; choose auto or fp8 (e4m3)")


def _hf_overrides(value: Any) -> dict[str, Any] | None:
    """``hf_overrides`` (vLLM's): config.json fields to replace, a mapping or its JSON text."""
    if value is None or value == "":
        return None
    return option_object(value, "hf_overrides")


def _speculative(value: Any) -> SpeculativeConfig | None:
    """``speculative_config``: a SpeculativeConfig, a mapping or its JSON text; None or empty: off."""
    if value is None or value == {} or value == "":
        return None
    return SpeculativeConfig.from_options(value)


def _lora_modules(value: Any) -> tuple[tuple[str, str], ...]:
    """LoRA adapters as (name, folder) pairs, from a mapping or from ``name=folder`` strings (the
    CLI's ``--lora-modules``); names must be unique and non-empty."""
    if value is None:
        return ()
    if isinstance(value, str):  # one adapter
        value = [value]
    if isinstance(value, Mapping):
        pairs = [(str(name), str(path)) for name, path in value.items()]
    else:
        pairs = []
        for item in value:
            name, sep, path = str(item).partition("=")
            if not sep or not name or not path:
                raise ValueError(f"lora_modules: {item!r} is not name=folder")
            pairs.append((name, path))
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"lora_modules: adapter names must be unique and non-empty, got {names}")
    return tuple(pairs)


def _default_dtype(model: ModelConfig, device: str) -> str:
    if model.torch_dtype not in ("bfloat16", "float16", "float32", "auto"):
        logger.warning("config.json's torch_dtype %r is not one inferd computes in; using the device's "
                       "default (--dtype chooses)", model.torch_dtype)  # fmt: skip
    if device == "cpu":
        return "float32"  # bf16 matmuls are slow on most CPUs
    return model.torch_dtype if model.torch_dtype in ("bfloat16", "float16") else "bfloat16"


def _resolve_max_model_len(model: ModelConfig, requested: int | None) -> int:
    limit = model.max_position_embeddings
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len {requested} exceeds the model's limit of {limit} tokens")
    return int(requested)


def _tensor_parallel_size(requested: int | None, model: ModelConfig) -> int:
    size = 1 if requested is None else int(requested)
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {size}")
    model.sharded(size)  # the model must split evenly
    return size


def resolve_num_blocks(config: EngineConfig) -> EngineConfig:
    """Size the KV pool from the memory budget and return a config that carries the block count.

    Call it after the weights are loaded: on a GPU the default budget is a share of what is left.
    """
    cache = config.cache
    # Per rank: under tensor parallelism each rank holds its share of the KV heads. A draft model's
    # cache holds as many blocks: the budget is for both.
    per_token = config.local_model.kv_bytes_per_token(config.kv_dtype) + _draft_kv_bytes_per_token(config)
    bytes_per_block = per_token * cache.block_size
    max_len = config.scheduler.max_model_len
    needed = most_blocks_held(config, max_len)
    if cache.num_blocks is None:
        # A draft model's weights load on a GPU after the cache: the default leaves them room.
        reserved = _draft_weight_bytes(config) if config.device.startswith("cuda") else 0
        budget = cache.kv_cache_memory or _default_kv_budget(
            config.device, reserved, cache.gpu_memory_utilization
        )
        if cache.kv_cache_memory is None and not config.device.startswith("cuda"):
            # On the CPU every rank's cache comes out of the same RAM: the default is for all of them.
            budget //= config.tensor_parallel_size
        num_blocks = budget // bytes_per_block
        if num_blocks < needed:
            whole = needed >= -(-max_len // cache.block_size)
            what = (
                f"one full context ({max_len})"
                if whole
                else f"one request's window and step ({needed} blocks)"
            )
            raise ValueError(
                f"KV cache budget of {budget / 2**20:.0f} MiB holds {num_blocks * cache.block_size} tokens, "
                f"fewer than {what}; raise --kv-cache-memory or lower --max-model-len"
            )
        cache = cache.with_num_blocks(int(num_blocks))
    elif cache.num_blocks < needed:
        # As vLLM refuses to start: a request that could never hold its blocks would be preempted
        # and readmitted forever.
        raise ValueError(
            f"num_kv_blocks {cache.num_blocks} of {cache.block_size} tokens are fewer than one request "
            f"of --max-model-len {max_len} may hold at once ({needed}); give more or lower --max-model-len"
        )
    assert cache.num_blocks is not None
    logger.info(
        "KV cache: %d blocks of %d tokens (%.1f MiB); up to %d tokens of context in flight, "
        "%.1f full-length requests",
        cache.num_blocks,
        cache.block_size,
        cache.num_blocks * bytes_per_block / 2**20,
        cache.num_blocks * cache.block_size,
        cache.num_blocks * cache.block_size / config.scheduler.max_model_len,
    )
    return dataclasses.replace(config, cache=cache)


def _triton_interpreted() -> bool:
    """Whether Triton's kernels run in its interpreter, on the CPU (read when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def most_blocks_held(config: EngineConfig, num_tokens: int) -> int:
    """The most KV blocks a request of ``num_tokens`` tokens (prompt and output) holds at once: all
    of its blocks, or, for a model whose every layer has a sliding window and no draft model (whose
    cache keeps every block), its window's and one step's (the blocks behind the window go back
    as it advances: ``KVCacheManager.release_out_of_window``)."""
    block_size = config.cache.block_size
    whole = -(-num_tokens // block_size)
    window = kv_window(config.model.layer_windows)
    if not window or (config.speculative is not None and config.speculative.model is not None):
        return whole
    # A step's tokens; with asynchronous scheduling, two steps' (the next is scheduled before the
    # last one's blocks go back).
    step = config.scheduler.max_num_batched_tokens * (2 if config.uses_async_scheduling else 1)
    # The keys window - 1 back from a step's first position, then the step's: each end in a part block.
    return min(whole, (window + step - 2) // block_size + 2)


def _draft_kv_bytes_per_token(config: EngineConfig) -> int:
    """A draft model's KV bytes per token, in the model's dtype (0 without one)."""
    speculative = config.speculative
    if speculative is None or speculative.model is None:
        return 0
    return ModelConfig.from_folder(Path(speculative.model)).kv_bytes_per_token(parse_dtype(config.dtype))


def _default_kv_budget(device: str, reserved: int = 0, utilization: float | None = None) -> int:
    """``reserved``: bytes still to be loaded on a GPU after the cache is allocated (a draft
    model's weights), left out of what the share is taken of. ``utilization``: the share of the
    GPU's whole memory this engine may hold, as vLLM's flag (two engines at 0.45 share a GPU): the
    cache gets it less what this process holds already (its weights); another process's memory
    counts only in that the cache must fit in what is free. None: a share of what is free."""
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        if utilization is None:
            return int(max(free - reserved, 0) * _GPU_KV_FRACTION)
        held = torch.cuda.memory_reserved()
        budget = max(int(utilization * total) - held - reserved, 0)
        if budget > free - reserved:
            allowed = utilization * total / 2**30
            raise ValueError(
                f"gpu_memory_utilization {utilization}: this engine may hold {allowed:.1f} GiB of the GPU's "
                f"{total / 2**30:.1f} GiB and holds {held / 2**30:.1f} GiB, but only {free / 2**30:.1f} GiB "
                "are free (another process holds the rest); lower it"
            )
        return budget
    return int(min(_available_ram() * _CPU_KV_FRACTION, _CPU_KV_CAP))


# Bytes an element of a checkpoint's non-float tensors takes as loaded, by safetensors' dtype names:
# low-bit values stay as stored (4-bit integers packed in int32 words, 8-bit floats and integers).
_STORED_BYTES = {"I64": 8, "I32": 4, "U32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1,
                 "F8_E5M2": 1}  # fmt: skip


def _draft_weight_bytes(config: EngineConfig) -> int:
    """A draft model's weights as it will hold them (0 without one), from its checkpoint's tensor
    shapes: floats in the served model's dtype, low-bit values as stored. On a GPU they load after
    the KV cache is allocated, into what it leaves."""
    speculative = config.speculative
    if speculative is None or speculative.model is None:
        return 0
    served = torch.empty((), dtype=parse_dtype(config.dtype)).element_size()
    total = 0
    for file in safetensors_files(Path(speculative.model)):
        with safe_open(str(file), framework="pt") as tensors:
            for name in tensors.keys():
                stored = tensors.get_slice(name)
                total += math.prod(stored.get_shape()) * _STORED_BYTES.get(stored.get_dtype(), served)
    return total


# cgroup v2, then v1: a container's memory limit, its usage, and the usage's statistics, with the
# name of the reclaimable file cache in them (/proc/meminfo shows the host's memory instead).
_CGROUP_MEMORY_FILES = (
    (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current"),
     Path("/sys/fs/cgroup/memory.stat"), "inactive_file"),
    (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"), Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
     Path("/sys/fs/cgroup/memory/memory.stat"), "total_inactive_file"),
)  # fmt: skip


def _available_ram() -> int:
    """Memory this process may still take: the host's available memory, or less when a container
    limit (a pod's, say) leaves less."""
    available = 4 * 2**30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    left = _cgroup_memory_left()
    return min(available, left) if left is not None else available


def _cgroup_memory_left() -> int | None:
    for limit_file, usage_file, stat_file, cache_key in _CGROUP_MEMORY_FILES:
        try:
            limit_text, usage_text = limit_file.read_text().strip(), usage_file.read_text().strip()
        except OSError:
            continue
        # "max" (v2) or a huge number (v1) means no limit.
        if limit_text == "max" or int(limit_text) >= 2**60:
            return None
        # Usage counts the page cache (the weights just read, say), which the kernel reclaims
        # before it kills anything: the working set is usage less the inactive file cache.
        working_set = int(usage_text) - _stat_value(stat_file, cache_key)
        return max(0, int(limit_text) - max(0, working_set))
    return None


def _stat_value(stat_file: Path, key: str) -> int:
    try:
        for line in stat_file.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
