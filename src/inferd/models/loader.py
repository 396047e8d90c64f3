"""Build a model from a Hugging Face folder and fill it from safetensors (never pickle)."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from inferd.config import EngineConfig, ModelConfig, ModelLoadError, read_json_object
from inferd.layers import quantized
from inferd.layers.linear import Linear
from inferd.layers.linear_operands import FP8_DTYPE
from inferd.models import gptq_awq, head_from_tokens
from inferd.models.kv_scales import KVScales, kv_scale_of
from inferd.models.moe import Experts
from inferd.models.registry import CausalLM, model_class
from inferd.quant_config import (
    GPTQ_AWQ,
    IGNORED_SUFFIXES,
    PACKED_SHAPE,
    PACKED_WEIGHT,
    SCALE_SUFFIXES,
    ZERO_POINT,
    QuantScheme,
)

logger = logging.getLogger(__name__)

# Checkpoint projection name -> (fused parameter name, shard index) for the fused layers.
FUSED_SHARDS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# Fused parameter name -> its checkpoint pieces, in shard order.
_FUSED_PIECES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise ModelLoadError(f"{index} has no 'weight_map' object of file names")
        files = sorted({path / name for name in weight_map.values()})
        folder = path.resolve()
        # The index is data from the folder: a shard name must not lead outside it or to a pickle.
        outside = [
            f.name for f in files if not f.resolve().is_relative_to(folder) or f.suffix != ".safetensors"
        ]
        if outside:
            raise ModelLoadError(
                f"{path}: the index names shards outside the folder or not safetensors: {outside}"
            )
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{path}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ModelLoadError(
            f"{path}: only pickle checkpoints (*.bin/*.pt) found; inferd loads safetensors only"
        )
    raise ModelLoadError(f"{path}: no model.safetensors or model.safetensors.index.json")


def iter_checkpoint(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(path):
        with _opened(file) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, f.get_tensor(name)


def checkpoint_names(path: Path) -> list[str]:
    """Every tensor's name in the checkpoint, from the files' headers alone."""
    names: list[str] = []
    for file in safetensors_files(path):
        with _opened(file) as f:
            names.extend(f.keys())
    return names


@contextmanager
def _opened(file: Path) -> Iterator[Any]:
    # A truncated or empty file fails in its header or in a tensor's data: either way a load
    # error naming the file, not the reader's own exception.
    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{file} is not a valid safetensors file: {exc}") from None


def load_model(
    path: Path,
    cfg: ModelConfig,
    max_positions: int,
    dtype: torch.dtype,
    device: str,
    load_format: str = "safetensors",
    shard: tuple[int, int] | None = None,
    quantization: str | None = None,
    kv_cache_scales: bool = False,
    tokenizer_path: Path | None = None,
) -> CausalLM:
    """Build the model directly on ``device`` in ``dtype`` and fill it from the checkpoint.

    ``tokenizer_path``: the folder of the tokenizer that names a ``classifier_from_token`` head's
    tokens, where it is not ``path`` (``--tokenizer``).

    ``load_format="dummy"`` draws seeded random weights instead (``fill_random``: model shapes for
    benchmarks).
    ``shard`` = ``(rank, size)`` fills one rank's slice under tensor parallelism; ``cfg`` is then
    that rank's shape (``ModelConfig.sharded``).
    ``quantization="fp8"`` makes the projections the checkpoint holds in 16 or 32 bits 8-bit floats
    once filled (``quantize_projections``).
    ``kv_cache_scales``: the KV cache is 8-bit, so the checkpoint's calibrated KV-cache scales, if
    it has any, are folded into the attention (``kv_scales.py``); otherwise they are left out.
    """
    cls = model_class(cfg.architecture)
    dummy = load_format == "dummy"
    files = [] if dummy else safetensors_files(path)  # fail on missing weights before allocating
    logger.info("loading %s (%s, %s) as %s on %s", path, cfg.architecture,
                "random weights" if dummy else f"{len(files)} file(s)", dtype, device)  # fmt: skip
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cfg, max_positions)
    finally:
        torch.set_default_dtype(previous_dtype)
    if dummy:
        fill_random(model)
        if cfg.quant is not None:  # the shape of a low-bit checkpoint: its values and blocks, random
            quantize_projections(model, cfg.quant)
    else:
        if cfg.quant is not None:
            hold_checkpoint_quantized(model, cfg, path)
            if torch.device(device).type == "cuda":
                # The wide weights just replaced, back to the device before it fills.
                torch.cuda.empty_cache()
        kv_scales = KVScales()
        weights = (
            (canonical_name(name, cfg.quant is not None), t)
            for name, t in _engine_tensors(_without_kv_scales(iter_checkpoint(path), kv_scales), cfg, device)
            if not (cfg.quant is not None and name.endswith(IGNORED_SUFFIXES))
        )
        if shard is not None:
            rank, size = shard
            # A checkpoint that ships q|k|v or gate|up fused (Phi-3) is split into its pieces first:
            # each piece is sliced by heads or rows on its own, as a separate one would be.
            pieces = (piece for name, t in weights for piece in split_fused_tensor(name, t, cfg, size))
            weights = ((name, shard_checkpoint_tensor(name, t, rank, size)) for name, t in pieces)
        head = cfg.head_from_tokens
        head_ids = head_from_tokens.token_ids(tokenizer_path or path, head) if head else []
        _fill_weights(model, weights, cfg, head_ids)
        for module_name, module in model.named_modules():
            if isinstance(module, Linear):
                # Reordered first: zero points are per group of the reordered columns.
                gptq_awq.order_input_columns(module, module_name)
                quantized.fold_zero_points(module)
        if kv_scales and kv_cache_scales:
            kv_scales.fold_into(model)
        elif kv_scales:
            logger.warning("%s: the checkpoint's calibrated KV-cache scales are not applied: they scale an "
                           "8-bit KV cache (kv_cache_dtype=fp8), and this one holds the model's dtype",
                           path)  # fmt: skip
        elif kv_cache_scales and cfg.quant is not None and cfg.quant.kv_cache_scales:
            raise ModelLoadError(f"{path}: config.json's kv_cache_scheme promises calibrated KV-cache scales "
                                 f"(k_scale, v_scale), and the checkpoint has none")  # fmt: skip
    # A low-bit checkpoint is served as it is: the projections it left wider stay so.
    if quantization == "fp8" and cfg.quant is None:
        quantize_projections(model, QuantScheme("fp8", None))
        if torch.device(device).type == "cuda":
            # The wide weights' memory back to the device, before the KV cache is sized from it.
            torch.cuda.empty_cache()
    model.eval()
    return cast(CausalLM, model)


def _without_kv_scales(
    tensors: Iterator[tuple[str, torch.Tensor]], kv_scales: KVScales
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors, its calibrated KV-cache scales taken into ``kv_scales``."""
    for name, tensor in tensors:
        found = kv_scale_of(name)
        if found is None:
            yield name, tensor
        else:
            kv_scales.add(name, *found, tensor)


def _engine_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]], cfg: ModelConfig, device: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors, a GPTQ or AWQ checkpoint's turned into the packed layout the
    engine holds (``gptq_awq.py``) on the model's ``device``."""
    if cfg.quant is None or cfg.quant.method not in GPTQ_AWQ:
        yield from tensors
        return
    for name, tensor in tensors:
        yield from gptq_awq.engine_tensors(name, tensor, cfg.quant, device)


# Random weights (``load_format="dummy"``): a freshly initialised Hugging Face model's scale.
DUMMY_SEED = 0
DUMMY_STD = 0.02


def fill_random(model: nn.Module) -> None:
    """Every matrix (embeddings, projections, the LM head) drawn from N(0, ``DUMMY_STD``), norm
    weights 1, biases 0, from a generator seeded with ``DUMMY_SEED`` on the model's device.

    torch's own initialisation gives embeddings of N(0, 1), which on a tied model outweigh all
    the layers together: the greedy token is the last prompt token whatever the layers compute.
    At this scale each layer moves the residual stream as in a trained model, so a kernel that
    computes the wrong thing changes the tokens; and every engine of a shape gets the same
    weights, whatever else ran in the process before, so two engines' tokens can be compared."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(DUMMY_SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, DUMMY_STD, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


def quantize_projections(model: nn.Module, scheme: QuantScheme) -> None:
    """Every attention and MLP projection, and a mixture's routed experts, made ``scheme``'s values
    in its blocks (one scale per output row: as accurate as the values allow for each row, whatever
    the spread between rows); the embeddings, the LM head, norms and the router stay as they
    are."""
    for module in model.modules():
        if isinstance(module, Linear):
            block = scheme.block_of(module.out_features, module.in_features)
            quantized.quantize_in_place(module, block, scheme.values, scheme.packed, scheme.zero_points)
        elif isinstance(module, Experts):
            module.quantize_in_place(scheme)


_TRITON_PDL = "inferd.layers.triton_pdl"


def enable_configured_kernels(model: CausalLM, config: EngineConfig) -> None:
    """Switch ``model``'s Triton kernels as ``config`` asks. The engine and every other rank of a
    tensor-parallel group call this one function, so all of them run the same kernels."""
    model.enable_triton_ops(
        config.uses_triton_ops,
        config.uses_triton_linear,
        config.uses_triton_fused_linear,
        config.uses_triton_tiled_linear,
        config.uses_triton_decode_rotary,
        config.uses_triton_moe,
    )
    # The launch switch is process-wide: set it either way where a kernel may have read it, so an
    # engine built after one with PDL does not inherit it. Where the module was never imported, no
    # kernel has launched with it and triton need not be imported to keep it off.
    pdl = config.uses_triton_pdl
    if pdl or _TRITON_PDL in sys.modules:
        triton_pdl = importlib.import_module(_TRITON_PDL)
        triton_pdl.set_enabled(pdl, torch.device(config.device))


# Where a checkpoint tensor goes inside its parameter: None for the whole parameter, else the index of
# a fused projection's piece, or an expert's index and, for its gate|up, the piece.
Slot = tuple[int, ...] | None


def _fill_weights(
    model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]], cfg: ModelConfig, head_ids: list[int]
) -> None:
    """Fill ``model`` from the checkpoint's ``weights``; ``head_ids``: the tokens whose LM-head rows
    make a classifier's head (``cfg.head_from_tokens``)."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    filled: set[tuple[str, Slot]] = set()
    head = cfg.head_from_tokens
    # Where such a head's rows come from: the LM head, or the embeddings it is tied to.
    head_source = ("model.embed_tokens.weight" if head.tied else "lm_head.weight") if head else None
    for name, tensor in weights:
        if "rotary_emb" in name:
            continue
        if head is not None and name == head_source:
            with torch.no_grad():
                params["lm_head.weight"].copy_(head_from_tokens.head_weight(tensor, head, head_ids))
            filled.add(("lm_head.weight", None))
            if name == "lm_head.weight":
                continue
        if head is not None and name == _CLASSIFIER_HEAD:
            raise ModelLoadError(f"checkpoint tensor {name!r}: the checkpoint has a classifier head of its "
                                 f"own, and classifier_from_token makes one from its LM head; leave one "
                                 f"out")  # fmt: skip
        if cfg.labels and name == "lm_head.weight":  # a classifier's checkpoint may keep its LM's head
            continue
        if cfg.labels and name == _CLASSIFIER_HEAD:  # a classifier's head takes the LM head's place
            name = "lm_head.weight"
        target, slot = _target_of(name)
        shown = _checkpoint_spelling(name, cfg)
        if name.endswith("." + PACKED_SHAPE) and cfg.quant is not None and cfg.quant.packed:
            module_name, _, param_name = target.rpartition(".")
            module = modules.get(module_name)
            if isinstance(module, Linear):
                in_features = module.in_features
            elif isinstance(module, Experts):
                in_features = module.in_features[param_name.removesuffix("_shape")]
            else:
                raise ModelLoadError(f"checkpoint tensor {shown!r} has no place in {cfg.architecture}")
            _check_packed_shape(params, target, slot, cfg, tensor, shown, in_features)
            continue
        packed = name.endswith("." + PACKED_WEIGHT)
        target = target.removesuffix("_packed") if packed else target
        if target not in params:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            if _spare_zero_bias(name, tensor, cfg):
                continue
            raise ModelLoadError(f"checkpoint tensor {shown!r} has no place in {cfg.architecture}")
        param = params[target]
        with torch.no_grad():
            if target.endswith(".weight_scale"):
                weight_rows = params[target.removesuffix("_scale")].shape[0]
                view = _scale_slot_view(param.data, weight_rows, slot, cfg, target, shown)
                tensor = _as_scale(tensor, view, shown)
            elif _is_expert_stack(target) and target.endswith("_proj_scale"):  # a low-bit expert's scales
                view = _slot_view(param.data, slot, cfg, target, shown)
                tensor = _as_scale(tensor, view, shown)
            elif _is_expert_stack(target) and target.endswith("_proj_zero_point") and cfg.quant is not None:
                view = _slot_view(param.data, slot, cfg, target, shown)
                tensor = _zero_points(tensor, cfg.quant.bits, view, shown)
            elif target.endswith(".g_idx"):
                # One input, one order: a fused projection's pieces each bring it.
                view = param.data
                # (A piece of another length fails the shape check of the copy below.)
                earlier = any(other == target for other, _ in filled) and view.shape == tensor.shape
                if earlier and not torch.equal(view, tensor.to(view.device)):
                    raise ModelLoadError(f"tensor {shown!r} orders the input columns otherwise than "
                                         f"the other pieces of its fused projection")  # fmt: skip
            elif target.endswith("." + ZERO_POINT) and cfg.quant is not None:
                weight_rows = params[target.removesuffix("_zero_point")].shape[0]
                view = _scale_slot_view(param.data, weight_rows, slot, cfg, target, shown)
                tensor = _zero_points(tensor, cfg.quant.bits, view, shown)
            else:
                view = _slot_view(param.data, slot, cfg, target, shown)
                if packed and cfg.quant is not None and view.dtype != torch.int32:  # else kept packed
                    tensor = _unpacked(tensor, cfg.quant.bits, view, shown)
            _copy_checked(view, tensor, shown)
        filled.add((target, slot))
    if cfg.tie_word_embeddings:
        filled.add(("lm_head.weight", None))
    _zero_absent_output_biases(params, filled, cfg)
    # A fused parameter needs every piece, stacked experts every expert: one left out would keep
    # its initial values unnoticed.
    missing = sorted(
        _checkpoint_spelling(_packed_name(name, param, cfg), cfg)
        for target, param in params.items()
        for name in _unfilled(target, param, filled)
    )
    if missing:
        raise ModelLoadError(
            f"checkpoint lacks tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )


def _zero_absent_output_biases(
    params: dict[str, nn.Parameter], filled: set[tuple[str, Slot]], cfg: ModelConfig
) -> None:
    """A checkpoint of q/k/v biases whose ``attention_bias`` also gives o_proj one, but that stores
    none (Qwen models converted to Llama's architecture): o_proj's biases are 0, as transformers
    initialises a bias the checkpoint lacks. Only where every layer lacks it; one that some layers
    have and others not is still a missing tensor."""
    targets = [target for target in params if target.endswith("self_attn.o_proj.bias")]
    absent = [target for target in targets if (target, None) not in filled]
    if not cfg.o_proj_bias or not targets or len(absent) != len(targets):
        return
    logger.warning("the checkpoint has no o_proj biases, though attention_bias gives o_proj one in %s; "
                   "they are 0, as transformers makes them", cfg.architecture)  # fmt: skip
    with torch.no_grad():
        for target in absent:
            params[target].zero_()
            filled.add((target, None))


# Under tensor parallelism, projections split by output rows (heads, intermediate units) and by
# input columns; everything else is whole on every rank.
_ROW_SPLIT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_COLUMN_SPLIT = ("o_proj", "down_proj")


def split_fused_tensor(
    name: str, tensor: torch.Tensor, cfg: ModelConfig, size: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint tensor of a fused projection (``qkv_proj``, ``gate_up_proj``) as its pieces,
    named as separate checkpoints name them; any other tensor as it is. ``cfg`` is one rank's shape
    out of ``size``, so the whole tensor's pieces are ``size`` times its sizes."""
    parts = name.split(".")
    fused = next((i for i, part in enumerate(parts) if part in _FUSED_PIECES), None)
    if fused is None or _is_expert_stack(name):  # every expert's gate|up stacked: sliced whole
        yield name, tensor
        return
    if parts[fused] == "qkv_proj":
        q, kv = cfg.num_heads * cfg.head_dim * size, cfg.num_kv_heads * cfg.head_dim * size
        sizes = [q, kv, kv]
    else:
        sizes = [cfg.intermediate_size * size] * 2
    pieces = [".".join([*parts[:fused], piece, *parts[fused + 1 :]]) for piece in _FUSED_PIECES[parts[fused]]]
    kind = parts[-1]
    if kind in ("weight_scale", ZERO_POINT) and tensor.numel() == 1:  # the fused tensor's one: each piece's
        yield from ((piece, tensor) for piece in pieces)
        return
    if kind == PACKED_SHAPE:  # the fused weight's [out, in], as each piece's
        yield from ((piece, torch.tensor([rows, int(tensor[1])], dtype=tensor.dtype))
                    for piece, rows in zip(pieces, sizes, strict=True))  # fmt: skip
        return
    # A row of block scales covers a block's rows, one of packed zero points a word's.
    unit = 1
    if cfg.quant is not None and kind == "weight_scale" and cfg.quant.block is not None:
        unit = cfg.quant.block[0]
    elif cfg.quant is not None and kind == ZERO_POINT:
        unit = cfg.quant.rows_per_zero_point_word
    if any(rows % unit for rows in sizes):
        raise ModelLoadError(f"tensor {name!r}: its pieces' rows {sizes} are not whole blocks of {unit}")
    sizes = [rows // unit for rows in sizes]
    if tensor.shape[0] != sum(sizes):
        raise ModelLoadError(
            f"tensor {name!r} has {tensor.shape[0]} rows, expected {sum(sizes)} from config.json"
        )
    yield from zip(pieces, tensor.split(sizes), strict=True)


def shard_checkpoint_tensor(name: str, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s slice of the checkpoint tensor ``name`` out of ``size`` ranks."""
    parts = name.split(".")
    if _is_expert_stack(name):
        # Every expert at once ([experts, 2 * intermediate, hidden] or [experts, hidden,
        # intermediate]): each expert's intermediate units are split as an MLP's are.
        if parts[-1] == "gate_up_proj":
            return torch.cat([half.chunk(size, dim=1)[rank] for half in tensor.chunk(2, dim=1)], dim=1)
        return tensor.chunk(size, dim=2)[rank]
    kind = parts[-1]
    row_split = any(part in _ROW_SPLIT for part in parts)
    column_split = any(part in _COLUMN_SPLIT for part in parts)
    if kind == PACKED_SHAPE and (row_split or column_split):  # a packed weight's [out, in]: this rank's
        share = tensor.clone()
        share[0 if row_split else 1] //= size
        return share
    # A low-bit weight's scales (``canonical_name``) and zero points: one for the whole tensor is
    # every rank's, and so is one per row, across the input columns; blocks and groups split.
    per_block = kind in ("weight_scale", ZERO_POINT)
    if per_block and tensor.numel() == 1:
        return tensor
    if row_split:
        return tensor.chunk(size, dim=0)[rank]
    blocks_across = per_block and tensor.dim() == 2 and tensor.shape[1] > 1
    if column_split and (kind in ("weight", PACKED_WEIGHT) or blocks_across):
        return tensor.chunk(size, dim=1)[rank]
    if column_split and kind == "bias":
        # Added once to the ranks' summed outputs: rank 0 holds it, the others zeros.
        return tensor if rank == 0 else torch.zeros_like(tensor)
    return tensor


# An expert's projections in a checkpoint (``...experts.<index>.<projection>.weight``) -> the stacked
# parameter of ``models/moe.py`` they fill, and their piece of it (None: the expert's whole slice).
_EXPERT_PIECES: dict[str, tuple[str, int | None]] = {
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", None),
}
# Mixtral's checkpoint names for the same tensors, and back.
_MIXTRAL_NAMES = {"block_sparse_moe": "mlp", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MIXTRAL_SPELLING = {ours: theirs for theirs, ours in _MIXTRAL_NAMES.items()}


def _packed_name(name: str, param: torch.Tensor, cfg: ModelConfig) -> str:
    """``name``, the weight of a projection that comes packed named as the packed tensor
    (``weight_packed``, or GPTQ's and AWQ's ``qweight``)."""
    packed = cfg.quant is not None and (cfg.quant.packed or cfg.quant.method in GPTQ_AWQ)
    if packed and name.endswith(".weight") and param.dtype in (torch.int8, torch.int32):
        return f"{name}_packed"
    return name


def _spare_zero_bias(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> bool:
    """Whether ``name`` is a bias of zeros that a GPTQ or AWQ checkpoint stores for a projection
    without one (AutoGPTQ wrote one for every layer it packed): left out, as it adds nothing."""
    return (
        cfg.quant is not None
        and cfg.quant.method in GPTQ_AWQ
        and name.endswith(".bias")
        and not tensor.count_nonzero().item()
    )


# What a ``*ForSequenceClassification`` checkpoint calls its head.
_CLASSIFIER_HEAD = "score.weight"
# What GPTQ and AWQ checkpoints call the tensors of a low-bit projection.
_GPTQ_AWQ_SPELLING = {PACKED_WEIGHT: "qweight", ZERO_POINT: "qzeros"}


def _checkpoint_spelling(name: str, cfg: ModelConfig) -> str:
    """A tensor's name as the checkpoint spells it, for messages (``canonical_name`` backwards):
    Mixtral's routed block as its own names (every Mixtral MLP is routed), a weight's scale and
    packed values as the checkpoint's format names them."""
    if cfg.labels and name == "lm_head.weight":
        return _CLASSIFIER_HEAD
    parts = name.split(".")
    if cfg.quant is not None and parts[-1] == "weight_scale":
        parts[-1] = cfg.quant.scale_name
    if cfg.quant is not None and cfg.quant.method in GPTQ_AWQ:
        parts[-1] = _GPTQ_AWQ_SPELLING.get(parts[-1], parts[-1])
    if cfg.architecture == "MixtralForCausalLM":
        parts = [_MIXTRAL_SPELLING.get(part, part) for part in parts]
    return ".".join(parts)


def canonical_name(name: str, scales: bool = False) -> str:
    """A checkpoint tensor's name as the model's parameters spell it: Mixtral's routed block
    (``block_sparse_moe``, experts ``w1``/``w3``/``w2``) takes Qwen-MoE's names; with
    ``scales``, a low-bit weight's scale is ``weight_scale`` whichever name it has."""
    parts = name.split(".")
    if scales and parts[-1] in SCALE_SUFFIXES:
        parts[-1] = "weight_scale"
    if "block_sparse_moe" not in parts:
        return ".".join(parts)
    return ".".join(_MIXTRAL_NAMES.get(part, part) for part in parts)


def hold_checkpoint_quantized(model: nn.Module, cfg: ModelConfig, path: Path) -> None:
    """Turn each projection the checkpoint stores in low-bit values (those with a scale tensor)
    into one that holds such weights (``layers/quantized.py:hold_quantized``: e4m3, int8, or 4-bit
    integers in the int32 words they come packed in), and a mixture's routed experts into stacks
    of them (``Experts.hold_low_bit``), ready to be filled."""
    assert cfg.quant is not None
    modules = dict(model.named_modules())
    names = checkpoint_names(path)
    scale_suffixes = ("scales",) if cfg.quant.method in GPTQ_AWQ else SCALE_SUFFIXES
    for name in names:
        if name.rsplit(".", 1)[-1] not in scale_suffixes:
            continue
        target, _slot = _target_of(canonical_name(name.rsplit(".", 1)[0] + ".weight"))
        module_name = target.rsplit(".", 1)[0]
        module = modules.get(module_name)
        if isinstance(module, Experts) and _is_expert_stack(target):
            _hold_experts_low_bit(module, cfg, name)
            continue
        if not isinstance(module, Linear):
            raise ModelLoadError(f"checkpoint tensor {name!r}: {module_name} cannot hold low-bit weights "
                                 f"in {cfg.architecture} (the attention and MLP projections "
                                 f"can)")  # fmt: skip
        if module.weight_block is None:
            out_features, in_features = module.weight.shape
            block, shape = (
                cfg.quant.block_of(out_features, in_features),
                cfg.quant.scale_shape(out_features, in_features),
            )
            dtype = quantized.storage_dtype(cfg.quant.values, cfg.quant.packed)
            quantized.hold_quantized(module, block, shape, dtype, cfg.quant.zero_points)
            if cfg.quant.input_order:  # each input column's group, filled from the checkpoint's g_idx
                g_idx = torch.zeros(in_features, dtype=torch.int32, device=module.weight.device)
                module.register_parameter("g_idx", nn.Parameter(g_idx, requires_grad=False))


def _hold_experts_low_bit(experts: Experts, cfg: ModelConfig, name: str) -> None:
    """A mixture's routed experts, stored in low-bit values with scales (``name`` is one of their
    scales): both stacks held so (``Experts.hold_low_bit``), once."""
    assert cfg.quant is not None
    if cfg.quant.input_order:
        raise ModelLoadError(f"checkpoint tensor {name!r}: a mixture's routed experts cannot hold weights "
                             f"quantized in activation order (desc_act); the attention and MLP "
                             f"projections can")  # fmt: skip
    if experts.weight_blocks:
        return
    experts.hold_low_bit(cfg.quant)
    # Each expert's gate and up halves take their own scale rows.
    block_rows = experts.weight_blocks["gate_up_proj"][0]
    intermediate = experts.gate_up_proj.shape[1] // 2
    if intermediate % block_rows:
        raise ModelLoadError(f"checkpoint tensor {name!r}: blocks of {block_rows} rows do not divide the "
                             f"experts' {intermediate} rows of gate and of up")  # fmt: skip


def _target_of(name: str) -> tuple[str, Slot]:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part == "experts" and parts[i + 1 : i + 2] and parts[i + 1].isdigit() and len(parts) == i + 4:
            piece = _EXPERT_PIECES.get(parts[i + 2])
            if piece is not None and parts[i + 3] in _EXPERT_TENSOR_SUFFIXES:
                stacked, half = piece
                stacked += _EXPERT_TENSOR_SUFFIXES[parts[i + 3]]
                expert = int(parts[i + 1])
                return ".".join([*parts[: i + 1], stacked]), (expert,) if half is None else (expert, half)
        if part in FUSED_SHARDS:
            fused, shard = FUSED_SHARDS[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1 :]), (shard,)
    return name, None


# An expert's checkpoint tensors -> the suffix of the stacked parameter they fill (the packed words'
# shape is checked against the stack, not stored).
_EXPERT_TENSOR_SUFFIXES = {
    "weight": "",
    PACKED_WEIGHT: "",
    "weight_scale": "_scale",
    ZERO_POINT: "_zero_point",
    PACKED_SHAPE: "_shape",
}


def _is_expert_stack(target: str) -> bool:
    return target.split(".")[-2:-1] == ["experts"]


def _slot_view(param: torch.Tensor, slot: Slot, cfg: ModelConfig, target: str, name: str) -> torch.Tensor:
    """The part of ``param`` that the checkpoint tensor ``name`` fills."""
    if slot is None:
        return param
    if _is_expert_stack(target):
        if slot[0] >= param.shape[0]:
            raise ModelLoadError(f"tensor {name!r} names an expert past the model's {param.shape[0]}")
        param = param[slot[0]]
        if len(slot) == 1:
            return param
        piece = slot[1]
    else:
        piece = slot[0]
    return param.narrow(0, *_piece_rows(param.shape[0], piece, cfg, target))


def _piece_rows(rows: int, piece: int, cfg: ModelConfig, target: str) -> tuple[int, int]:
    """The first row and row count of piece ``piece`` of a fused projection of ``rows`` rows."""
    if ".qkv_proj." in target:
        q = cfg.num_heads * cfg.head_dim
        kv = cfg.num_kv_heads * cfg.head_dim
        return [(0, q), (q, kv), (q + kv, kv)][piece]
    # gate|up: two halves (a shared expert's are not the config's intermediate size).
    half = rows // 2
    return piece * half, half


def _scale_slot_view(
    scale: torch.Tensor, weight_rows: int, slot: Slot, cfg: ModelConfig, target: str, name: str
) -> torch.Tensor:
    """The rows of a low-bit projection's scales that the checkpoint's scale ``name`` fills:
    those of its piece's weight rows, which must cover whole blocks (the last piece may end in a
    partial one)."""
    if slot is None:
        return scale
    start, size = _piece_rows(weight_rows, slot[0], cfg, target)
    block_rows = cfg.quant.block[0] if cfg.quant is not None and cfg.quant.block is not None else 1
    if not quantized.spans_whole_blocks(start, size, weight_rows, block_rows):
        raise ModelLoadError(f"tensor {name!r}: its {size} rows from row {start} of the fused projection do "
                             f"not span whole blocks of {block_rows} rows")  # fmt: skip
    return scale.narrow(0, start // block_rows, -(-size // block_rows))


def _as_scale(tensor: torch.Tensor, view: torch.Tensor, name: str) -> torch.Tensor:
    """A checkpoint's scale in the shape of the rows it fills: one per tensor given to every row
    (or block), one per channel as a column; powers of two stored as 8-bit exponents (UE8M0, as
    DeepSeek-V3.1's checkpoints store them) widened to float32, which holds them exactly."""
    if tensor.dtype == torch.float8_e8m0fnu:
        tensor = tensor.float()
    elif tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ModelLoadError(f"scale {name!r} has dtype {tensor.dtype}; scales are float32, bfloat16, "
                             f"float16 or float8_e8m0fnu")  # fmt: skip
    return _spread(tensor, view)


def _spread(tensor: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """A per-block tensor in the shape of the rows it fills: one per tensor given to every row
    (or block), one per channel as a column."""
    if tensor.numel() == 1:
        return tensor.reshape(1, 1).expand(view.shape)
    if tensor.dim() == 1 and view.shape[1] == 1:
        return tensor[:, None]
    return tensor


def _zero_points(tensor: torch.Tensor, bits: int, view: torch.Tensor, name: str) -> torch.Tensor:
    """A checkpoint's zero points in the shape of the rows they fill: packed down the rows in int32
    words (per group or channel, as compressed-tensors packs them), or int8 as they are (its
    per-tensor ones)."""
    if tensor.dtype == torch.int32:
        return _unpacked(tensor, bits, view, name, down_rows=True)
    return _spread(tensor, view)


def _unfilled(target: str, param: torch.Tensor, filled: set[tuple[str, Slot]]) -> list[str]:
    """The checkpoint names of ``target``'s pieces that no tensor filled."""
    if (target, None) in filled:  # whole, also a fused parameter a checkpoint ships fused
        return []
    parts = target.split(".")
    if _is_expert_stack(target):
        stack, kind = parts[-1], "weight"
        for checkpoint_kind, suffix in (("weight_scale", "_scale"), (ZERO_POINT, "_zero_point")):
            if stack.endswith(suffix):
                stack, kind = stack.removesuffix(suffix), checkpoint_kind
        pieces = [(name, half) for name, (stacked, half) in _EXPERT_PIECES.items() if stacked == stack]
        return [".".join([*parts[:-1], str(expert), piece, kind])
                for expert in range(param.shape[0]) for piece, half in pieces
                if (target, (expert,) if half is None else (expert, half)) not in filled]  # fmt: skip
    fused = next((i for i, part in enumerate(parts) if part in _FUSED_PIECES), None)
    if fused is None:
        return [target]
    pieces_of = _FUSED_PIECES[parts[fused]]
    return [".".join([*parts[:fused], piece, *parts[fused + 1 :]])
            for shard, piece in enumerate(pieces_of) if (target, (shard,)) not in filled]  # fmt: skip


def _check_packed_shape(
    params: dict[str, nn.Parameter],
    target: str,
    slot: Slot,
    cfg: ModelConfig,
    shape: torch.Tensor,
    name: str,
    in_features: int,
) -> None:
    """A packed weight's ``weight_shape`` must be the shape of the rows it fills (the projection's
    ``in_features`` wide): the packed words alone cannot tell a narrower weight padded to whole
    words from the model's."""
    weight = params.get(target.removesuffix("_shape"))
    if weight is None:
        raise ModelLoadError(f"checkpoint tensor {name!r} has no place in {cfg.architecture}")
    expected = [_slot_view(weight.data, slot, cfg, target, name).shape[0], in_features]
    if shape.tolist() != expected:
        raise ModelLoadError(f"tensor {name!r} gives the shape {shape.tolist()}, expected {expected}")


def _unpacked(
    words: torch.Tensor, bits: int, view: torch.Tensor, name: str, down_rows: bool = False
) -> torch.Tensor:
    """Packed integers (``quantized.unpack_int32``) in ``view``'s shape: a weight's values packed
    along its rows, or with ``down_rows`` zero points packed down its columns."""
    if view.dtype != torch.int8:
        raise ModelLoadError(f"tensor {name!r} holds packed integers for a projection without a scale")
    try:
        if down_rows:
            return quantized.unpack_int32_rows(words, bits, view.shape[0])
        return quantized.unpack_int32(words, bits, view.shape[1])
    except ValueError as exc:
        raise ModelLoadError(f"tensor {name!r}: {exc}") from None


# What low-bit projections hold: e4m3 or int8 values, or 4-bit ones packed into int32 words.
_LOW_BIT = (FP8_DTYPE, torch.int8, torch.int32)


def _copy_checked(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    # A projection of 8-bit values takes its own kind alone: any other would be cast without
    # complaint, as would 8-bit values (float or integer) into a wide projection, which need the
    # scales that make such a projection.
    if param.dtype in _LOW_BIT and tensor.dtype != param.dtype:
        raise ModelLoadError(f"tensor {name!r} has dtype {tensor.dtype}; its projection's other weights are "
                             f"{param.dtype} with scales")  # fmt: skip
    if param.dtype not in _LOW_BIT and tensor.element_size() == 1:
        raise ModelLoadError(f"tensor {name!r} is {tensor.dtype} without a scale (weight_scale or "
                             f"weight_scale_inv) beside it")  # fmt: skip
    if not tensor.is_floating_point() and param.dtype not in (torch.int8, torch.int32):
        raise ModelLoadError(f"tensor {name!r} has dtype {tensor.dtype}; inferd loads floating-point weights")
    if param.shape != tensor.shape:
        raise ModelLoadError(
            f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
        )
    param.copy_(tensor)
