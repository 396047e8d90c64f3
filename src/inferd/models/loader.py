"""Build a model from a Hugging Face folder and fill it from safetensors (never pickle)."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from inferd.config import EngineConfig, ModelConfig, ModelLoadError, read_json_object
from inferd.models.registry import CausalLM, model_class

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
        # A truncated or empty file fails in its header or in a tensor's data: either way a load
        # error naming the file, not the reader's own exception.
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield name, f.get_tensor(name)
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
) -> CausalLM:
    """Build the model directly on ``device`` in ``dtype`` and fill it from the checkpoint.

    ``load_format="dummy"`` draws seeded random weights instead (``fill_random``: model shapes for
    benchmarks).
    ``shard`` = ``(rank, size)`` fills one rank's slice under tensor parallelism; ``cfg`` is then
    that rank's shape (``ModelConfig.sharded``).
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
    else:
        weights = ((canonical_name(name), t) for name, t in iter_checkpoint(path))
        if shard is not None:
            rank, size = shard
            # A checkpoint that ships q|k|v or gate|up fused (Phi-3) is split into its pieces first:
            # each piece is sliced by heads or rows on its own, as a separate one would be.
            pieces = (piece for name, t in weights for piece in split_fused_tensor(name, t, cfg, size))
            weights = ((name, shard_checkpoint_tensor(name, t, rank, size)) for name, t in pieces)
        _fill_weights(model, weights, cfg)
    model.eval()
    return cast(CausalLM, model)


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


def _fill_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]], cfg: ModelConfig) -> None:
    params = dict(model.named_parameters())
    filled: set[tuple[str, Slot]] = set()
    for name, tensor in weights:
        if "rotary_emb" in name:
            continue
        target, slot = _target_of(name)
        shown = _checkpoint_spelling(name, cfg.architecture)
        if target not in params:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise ModelLoadError(f"checkpoint tensor {shown!r} has no place in {cfg.architecture}")
        param = params[target]
        with torch.no_grad():
            view = _slot_view(param.data, slot, cfg, target, shown)
            _copy_checked(view, tensor, shown)
        filled.add((target, slot))
    if cfg.tie_word_embeddings:
        filled.add(("lm_head.weight", None))
    # A fused parameter needs every piece, stacked experts every expert: one left out would keep
    # its initial values unnoticed.
    missing = sorted(
        _checkpoint_spelling(name, cfg.architecture)
        for target, param in params.items()
        for name in _unfilled(target, param, filled)
    )
    if missing:
        raise ModelLoadError(
            f"checkpoint lacks tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )


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
    if tensor.shape[0] != sum(sizes):
        raise ModelLoadError(
            f"tensor {name!r} has {tensor.shape[0]} rows, expected {sum(sizes)} from config.json"
        )
    for piece, rows in zip(_FUSED_PIECES[parts[fused]], tensor.split(sizes), strict=True):
        yield ".".join([*parts[:fused], piece, *parts[fused + 1 :]]), rows


def shard_checkpoint_tensor(name: str, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s slice of the checkpoint tensor ``name`` out of ``size`` ranks."""
    parts = name.split(".")
    if _is_expert_stack(name):
        # Every expert at once ([experts, 2 * intermediate, hidden] or [experts, hidden,
        # intermediate]): each expert's intermediate units are split as an MLP's are.
        if parts[-1] == "gate_up_proj":
            return torch.cat([half.chunk(size, dim=1)[rank] for half in tensor.chunk(2, dim=1)], dim=1)
        return tensor.chunk(size, dim=2)[rank]
    if any(part in _ROW_SPLIT for part in parts):
        return tensor.chunk(size, dim=0)[rank]
    if any(part in _COLUMN_SPLIT for part in parts) and parts[-1] == "weight":
        return tensor.chunk(size, dim=1)[rank]
    if any(part in _COLUMN_SPLIT for part in parts) and parts[-1] == "bias":
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


def _checkpoint_spelling(name: str, architecture: str) -> str:
    """A tensor's name as the checkpoint spells it, for messages: Mixtral's routed block as its own
    names (``canonical_name`` backwards; every Mixtral MLP is routed)."""
    if architecture != "MixtralForCausalLM":
        return name
    return ".".join(_MIXTRAL_SPELLING.get(part, part) for part in name.split("."))


def canonical_name(name: str) -> str:
    """A checkpoint tensor's name as the model's parameters spell it: Mixtral's routed block
    (``block_sparse_moe``, experts ``w1``/``w3``/``w2``) takes Qwen-MoE's names; others as they are."""
    parts = name.split(".")
    if "block_sparse_moe" not in parts:
        return name
    return ".".join(_MIXTRAL_NAMES.get(part, part) for part in parts)


def _target_of(name: str) -> tuple[str, Slot]:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part == "experts" and parts[i + 1 : i + 2] and parts[i + 1].isdigit() and len(parts) == i + 4:
            piece = _EXPERT_PIECES.get(parts[i + 2])
            if piece is not None and parts[i + 3] == "weight":
                stacked, half = piece
                expert = int(parts[i + 1])
                return ".".join([*parts[: i + 1], stacked]), (expert,) if half is None else (expert, half)
        if part in FUSED_SHARDS:
            fused, shard = FUSED_SHARDS[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1 :]), (shard,)
    return name, None


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
    if target.endswith("qkv_proj.weight") or target.endswith("qkv_proj.bias"):
        q = cfg.num_heads * cfg.head_dim
        kv = cfg.num_kv_heads * cfg.head_dim
        start, size = [(0, q), (q, kv), (q + kv, kv)][piece]
        return param.narrow(0, start, size)
    # gate|up: two halves (a shared expert's are not the config's intermediate size).
    half = param.shape[0] // 2
    return param.narrow(0, piece * half, half)


def _unfilled(target: str, param: torch.Tensor, filled: set[tuple[str, Slot]]) -> list[str]:
    """The checkpoint names of ``target``'s pieces that no tensor filled."""
    if (target, None) in filled:  # whole, also a fused parameter a checkpoint ships fused
        return []
    parts = target.split(".")
    if _is_expert_stack(target):
        pieces = [(name, half) for name, (stacked, half) in _EXPERT_PIECES.items() if stacked == parts[-1]]
        return [".".join([*parts[:-1], str(expert), piece, "weight"])
                for expert in range(param.shape[0]) for piece, half in pieces
                if (target, (expert,) if half is None else (expert, half)) not in filled]  # fmt: skip
    fused = next((i for i, part in enumerate(parts) if part in _FUSED_PIECES), None)
    if fused is None:
        return [target]
    pieces_of = _FUSED_PIECES[parts[fused]]
    return [".".join([*parts[:fused], piece, *parts[fused + 1 :]])
            for shard, piece in enumerate(pieces_of) if (target, (shard,)) not in filled]  # fmt: skip


def _copy_checked(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if not tensor.is_floating_point():
        # An integer tensor would be cast without complaint (quantized weights need their scales).
        raise ModelLoadError(f"tensor {name!r} has dtype {tensor.dtype}; inferd loads floating-point weights")
    if param.shape != tensor.shape:
        raise ModelLoadError(
            f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
        )
    param.copy_(tensor)
