"""How a checkpoint's ``quantization_config`` stores 8-bit float weights, read into one scheme.

Two layouts are served, the two that 8-bit float checkpoints on the Hugging Face hub use:
- ``quant_method: "fp8"`` (transformers' ``FineGrainedFP8Config``; Qwen3's and DeepSeek's FP8
  releases): ``weight`` in float8_e4m3fn and ``weight_scale_inv``, one float32 scale per
  ``weight_block_size`` block (default 128 x 128); without a block size, one ``weight_scale`` per
  tensor;
- ``quant_method: "compressed-tensors"`` in its ``float-quantized`` format (llm-compressor's
  FP8 checkpoints): ``weight`` in float8_e4m3fn and ``weight_scale`` per tensor, per output
  channel or per block.

Either way the weight is ``fp8 * scale``, block by block. Which projections are stored so is read
from the checkpoint itself (a module with a scale tensor is), not from the config's ignore lists,
whose spellings differ between the two tools.

Activations are computed unquantized (an 8-bit weight times a 16-bit activation, as vLLM's
weight-only fallback computes such a checkpoint): the configs' activation schemes, dynamic or
static, are not applied, and static input scales are dropped at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The checkpoint tensors that scale a weight (both mean: weight = fp8 * scale).
SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")
# Static activation scales, and the KV cache's calibrated ones: read by nothing here (activations
# stay unquantized; an 8-bit KV cache, kv_cache_dtype="fp8", is stored without scales).
IGNORED_SUFFIXES = ("input_scale", "activation_scale", "k_scale", "v_scale", "kv_scale")

_SUPPORTED = "'fp8', or 'compressed-tensors' in its float-quantized format"


@dataclass(frozen=True)
class Fp8Scheme:
    """8-bit float (e4m3) weights and their float32 scales.

    ``block`` is the (rows, columns) of weight that one scale covers; None means one scale per
    output row (a per-channel scale, or a per-tensor one given to every row, which lets a fused
    q|k|v hold three different ones)."""

    method: str
    block: tuple[int, int] | None

    @property
    def scale_name(self) -> str:
        """How the checkpoint names a weight's scale (for messages): the fp8 method's block scales
        are ``weight_scale_inv``, every other scale ``weight_scale``."""
        return "weight_scale_inv" if self.method == "fp8" and self.block is not None else "weight_scale"

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        if self.block is None:
            return out_features, 1
        rows, columns = self.block
        return -(-out_features // rows), -(-in_features // columns)

    def block_of(self, out_features: int, in_features: int) -> tuple[int, int]:
        """The (rows, columns) of weight one scale covers in a [out, in] projection."""
        return self.block if self.block is not None else (1, in_features)


def read_quantization(cfg: dict[str, Any]) -> Fp8Scheme | None:
    """The scheme of ``config.json``'s ``quantization_config``; None without one (ValueError for
    a method or format the engine does not compute)."""
    quant = cfg.get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise ValueError("quantization_config must be an object")
    method = quant.get("quant_method")
    if method == "fp8":
        if quant.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"fp8 format {quant.get('fmt')!r} is not supported (e4m3 is)")
        block = quant.get("weight_block_size")
        return Fp8Scheme("fp8", None if block is None else _block(block, "weight_block_size"))
    if method == "compressed-tensors":
        return _compressed_tensors(quant)
    raise ValueError(f"quantization method {method!r} is not supported; the engine loads {_SUPPORTED}")


def _compressed_tensors(quant: dict[str, Any]) -> Fp8Scheme:
    if quant.get("kv_cache_scheme"):
        raise ValueError("compressed-tensors' kv_cache_scheme (an 8-bit KV cache) is not supported")
    # Weights stored rotated or sparse would load without complaint and compute wrongly.
    if quant.get("transform_config"):
        raise ValueError("compressed-tensors' transform_config (rotated weights) is not supported")
    sparsity = quant.get("sparsity_config") or {}
    if sparsity.get("format", "dense") != "dense":
        raise ValueError(f"compressed-tensors' sparsity format {sparsity.get('format')!r} is not supported")
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    blocks: set[tuple[int, int] | None] = set()
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            raise ValueError(f"compressed-tensors group {name!r} quantizes no weights")
        fmt = group.get("format") or quant.get("format")
        if weights.get("type") != "float" or weights.get("num_bits") != 8 or fmt != "float-quantized":
            raise ValueError(
                f"compressed-tensors group {name!r} stores {weights.get('num_bits')}-bit "
                f"{weights.get('type')} weights as {fmt!r}; the engine loads {_SUPPORTED}"
            )
        if weights.get("symmetric") is False:
            raise ValueError(f"compressed-tensors group {name!r} has asymmetric weights (zero points)")
        strategy = weights.get("strategy")
        if strategy in ("tensor", "channel"):
            blocks.add(None)
        elif strategy == "block":
            blocks.add(_block(weights.get("block_structure"), "block_structure"))
        else:
            raise ValueError(f"compressed-tensors weight strategy {strategy!r} is not supported "
                             f"(tensor, channel and block are)")  # fmt: skip
    if len(blocks) > 1:
        raise ValueError("compressed-tensors groups with different weight strategies are not supported")
    return Fp8Scheme("compressed-tensors", blocks.pop())


def _block(value: Any, field: str) -> tuple[int, int]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{field} must be two positive integers, got {value!r}")
    return int(value[0]), int(value[1])
