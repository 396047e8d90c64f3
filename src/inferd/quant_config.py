"""How a checkpoint's ``quantization_config`` stores low-bit weights, read into one scheme.

The layouts served are those of the Hugging Face hub's 8-bit float and integer checkpoints:
- ``quant_method: "fp8"`` (transformers' ``FineGrainedFP8Config``; Qwen3's and DeepSeek's FP8
  releases): ``weight`` in float8_e4m3fn and ``weight_scale_inv``, one float32 scale per
  ``weight_block_size`` block (default 128 x 128); without a block size, one ``weight_scale`` per
  tensor;
- ``quant_method: "compressed-tensors"`` (llm-compressor's checkpoints):
  - ``float-quantized``: ``weight`` in float8_e4m3fn and ``weight_scale`` per tensor, per output
    channel or per block (FP8, FP8-dynamic);
  - ``pack-quantized``: 4-bit integers (with or without zero points, ``weight_zero_point``) or
    symmetric 8-bit ones packed eight or four to an int32 along the input (``weight_packed``, with
    ``weight_shape``) and ``weight_scale`` per tensor, output channel or group of input columns
    (W4A16, W8A16);
  - ``int-quantized`` / ``naive-quantized``: ``weight`` in int8 and ``weight_scale`` (W8A8);
- ``quant_method: "gptq"`` (AutoGPTQ's and GPTQModel's checkpoints, Qwen's GPTQ-Int4 and -Int8
  releases) and ``quant_method: "awq"`` (AutoAWQ's GEMM layout, Qwen's AWQ releases): ``qweight``
  (integers packed into int32 words), ``qzeros`` and ``scales`` per group of input columns, which
  ``models/gptq_awq.py`` turns into the packed layout above as they load.

Either way the weight is ``values * scale``, block by block. Which projections are stored so is
read from the checkpoint itself (a module with a scale tensor is), not from the config's ignore
lists, whose spellings differ between the tools.

Activations are computed unquantized (a low-bit weight times a 16-bit activation, as vLLM's
weight-only kernels compute such checkpoints): the configs' activation schemes, dynamic or
static, are not applied, and static input scales are dropped at load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# The checkpoint tensors that scale a weight (both mean: weight = values * scale).
SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")
# What is read by nothing here: static activation scales and zero points (activations stay
# unquantized). The KV cache's calibrated scales, some of them named as output scales, are taken out
# before (``models/kv_scales.py``).
IGNORED_SUFFIXES = (
    "input_scale",
    "input_zero_point",
    "output_scale",
    "output_zero_point",
    "activation_scale",
)
# compressed-tensors' packed integers: the int32 words, the unpacked weight's shape, and the zero
# points of asymmetric ones (packed along the output rows).
PACKED_WEIGHT = "weight_packed"
PACKED_SHAPE = "weight_shape"
ZERO_POINT = "weight_zero_point"

_SUPPORTED = (
    "'fp8', 'compressed-tensors' with 8-bit float weights (float-quantized), 4-bit integer weights "
    "(pack-quantized, with or without zero points) or symmetric 8-bit ones (pack-quantized, "
    "int-quantized), 'gptq' (4-bit, and symmetric 8-bit) and 'awq' (4-bit, GEMM layout)"
)
_INT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")
# The methods whose checkpoints store ``qweight``, ``qzeros`` and ``scales`` (``models/gptq_awq.py``).
GPTQ_AWQ = ("gptq", "awq")


@dataclass(frozen=True)
class QuantScheme:
    """Low-bit weights and their float32 scales.

    ``values``: "fp8" (e4m3), "int8" or "int4" (signed; packed 4-bit ones stay packed, others are
    held as int8 once loaded). ``block`` is
    the (rows, columns) of weight that one scale covers; None means one scale per output row (a
    per-channel scale, or a per-tensor one given to every row, which lets a fused q|k|v hold three
    different ones). ``packed``: integers come packed into int32 words (``weight_packed``)."""

    method: str
    block: tuple[int, int] | None
    values: str = "fp8"
    packed: bool = False
    # Asymmetric integers: each block also has a zero point (``weight_zero_point``), and the weight
    # is ``(values - zero_point) * scale``.
    zero_points: bool = False
    # What to add to each zero point as a GPTQ checkpoint stores it: its first format ("gptq", the
    # default) stores them minus one, subtracted from each packed word's fields at once; "gptq_v2"
    # as they are.
    zero_point_offset: int = 0
    # compressed-tensors' ``kv_cache_scheme``: the checkpoint brings calibrated KV-cache scales.
    kv_cache_scales: bool = False
    # GPTQ's activation order (``desc_act``): a ``g_idx`` gives each input column's group, and the
    # groups are not runs of consecutive columns; the loader reorders the columns so they are,
    # and each projection reorders its input alike.
    input_order: bool = False

    @property
    def scale_name(self) -> str:
        """How the checkpoint names a weight's scale (for messages): GPTQ's and AWQ's are
        ``scales``, the fp8 method's block scales ``weight_scale_inv``, every other scale
        ``weight_scale``."""
        if self.method in GPTQ_AWQ:
            return "scales"
        return "weight_scale_inv" if self.method == "fp8" and self.block is not None else "weight_scale"

    @property
    def bits(self) -> int:
        return 4 if self.values == "int4" else 8

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        if self.block is None:
            return out_features, 1
        rows, columns = self.block
        return -(-out_features // rows), -(-in_features // columns)

    @property
    def splits_over_ranks(self) -> bool:
        """Whether tensor parallelism can split these weights along the rows and columns the ranks
        take: all but GPTQ's activation order, whose reordered columns follow no rank's share."""
        return not self.input_order

    @property
    def values_per_word(self) -> int:
        """Values packed into one int32 word along a row (1 where each has an element)."""
        return 32 // self.bits if self.packed else 1

    @property
    def rows_per_zero_point_word(self) -> int:
        """Rows whose zero points share an int32 word: compressed-tensors packs them down the rows
        (GPTQ's and AWQ's are unpacked as they load); 1 without zero points."""
        return 32 // self.bits if self.zero_points and self.method == "compressed-tensors" else 1

    def block_of(self, out_features: int, in_features: int) -> tuple[int, int]:
        """The (rows, columns) of weight one scale covers in a [out, in] projection."""
        return self.block if self.block is not None else (1, in_features)


def read_quantization(cfg: dict[str, Any]) -> QuantScheme | None:
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
        return QuantScheme("fp8", None if block is None else _block(block, "weight_block_size"))
    if method == "compressed-tensors":
        return _compressed_tensors(quant)
    if method == "gptq":
        return _gptq(quant)
    if method == "awq":
        return _awq(quant)
    raise ValueError(f"quantization method {method!r} is not supported; the engine loads {_SUPPORTED}")


def _compressed_tensors(quant: dict[str, Any]) -> QuantScheme:
    kv_scheme = quant.get("kv_cache_scheme")
    if kv_scheme:
        _check_kv_cache_scheme(kv_scheme)
    # Weights stored rotated or sparse would load without complaint and compute wrongly.
    if quant.get("transform_config"):
        raise ValueError("compressed-tensors' transform_config (rotated weights) is not supported")
    sparsity = quant.get("sparsity_config") or {}
    if sparsity.get("format", "dense") != "dense":
        raise ValueError(f"compressed-tensors' sparsity format {sparsity.get('format')!r} is not supported")
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    schemes = {_group_scheme(name, group, quant.get("format")) for name, group in groups.items()}
    if len(schemes) > 1:
        raise ValueError("compressed-tensors groups that store weights differently are not supported")
    return dataclasses.replace(schemes.pop(), kv_cache_scales=bool(kv_scheme))


def _check_kv_cache_scheme(scheme: Any) -> None:
    """compressed-tensors' ``kv_cache_scheme``: 8-bit floats with one static scale per layer for
    the keys and one for the values (``k_scale``, ``v_scale``), which an 8-bit KV cache applies
    (``models/kv_scales.py``); any other is refused."""
    if not isinstance(scheme, dict):
        raise ValueError("kv_cache_scheme must be an object")
    kind = (
        scheme.get("type"),
        scheme.get("num_bits"),
        scheme.get("strategy", "tensor"),
        scheme.get("dynamic"),
    )
    if scheme.get("symmetric") is False:
        raise ValueError(
            "compressed-tensors' kv_cache_scheme with zero points (symmetric: false) is not supported"
        )
    if kind != ("float", 8, "tensor", False):
        raise ValueError(f"compressed-tensors' kv_cache_scheme {kind[1]!r}-bit {kind[0]!r}, strategy "
                         f"{kind[2]!r}, dynamic {kind[3]!r} is not supported (8-bit floats with static "
                         f"per-tensor scales are)")  # fmt: skip


def _group_scheme(name: str, group: Any, default_format: Any) -> QuantScheme:
    weights = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(weights, dict):
        raise ValueError(f"compressed-tensors group {name!r} quantizes no weights")
    fmt = group.get("format") or default_format
    kind, bits = weights.get("type"), weights.get("num_bits")
    floats = kind == "float" and bits == 8 and fmt == "float-quantized"
    ints = kind == "int" and (bits == 4 and fmt == "pack-quantized" or bits == 8 and fmt in _INT_FORMATS)
    if not (floats or ints):
        raise ValueError(f"compressed-tensors group {name!r} stores {bits}-bit {kind} weights as {fmt!r}; "
                         f"the engine loads {_SUPPORTED}")  # fmt: skip
    # Asymmetric 4-bit integers (llm-compressor's AWQ output) are held as values minus their zero
    # point, which an int8 holds; 8-bit ones would not fit.
    zero_points = weights.get("symmetric") is False
    if zero_points and not (ints and bits == 4 and fmt == "pack-quantized"):
        raise ValueError(f"compressed-tensors group {name!r} has asymmetric {bits}-bit {kind} weights (zero "
                         f"points); only packed 4-bit integers may have them")  # fmt: skip
    # "static" (or "weight") ordering changes how the scales were chosen, not how they are stored;
    # "group" (or "dynamic", or the old true) permutes the groups, which takes a g_idx to undo.
    if weights.get("actorder") not in (None, False, "static", "weight"):
        raise ValueError(f"compressed-tensors group {name!r} orders its groups by activation "
                         f"(actorder {weights.get('actorder')!r})")  # fmt: skip
    strategy = weights.get("strategy")
    if strategy in ("tensor", "channel"):
        block = None
    elif strategy == "block" and floats:
        block = _block(weights.get("block_structure"), "block_structure")
    elif strategy == "group" and ints:
        block = (1, _positive(weights.get("group_size"), "group_size"))
    else:
        raise ValueError(f"compressed-tensors weight strategy {strategy!r} is not supported for {kind} "
                         f"weights (tensor, channel, and block for floats or group for integers "
                         f"are)")  # fmt: skip
    values = "fp8" if floats else f"int{bits}"
    return QuantScheme(
        "compressed-tensors", block, values, packed=fmt == "pack-quantized", zero_points=zero_points
    )


def _gptq(quant: dict[str, Any]) -> QuantScheme:
    bits = quant.get("bits")
    if bits not in (4, 8):
        raise ValueError(f"GPTQ checkpoints of bits {bits!r} are not supported (4- and 8-bit ones are)")
    if quant.get("is_marlin_format"):
        raise ValueError("GPTQ checkpoints in Marlin's layout (is_marlin_format) are not supported")
    # GPTQModel names the layout "checkpoint_format" (older configs) or "format".
    fmt = quant.get("checkpoint_format") or quant.get("format") or "gptq"
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint format {fmt!r} is not supported ('gptq' and 'gptq_v2' are)")
    # GPTQModel's per-module overrides: "-:" keys leave modules unquantized, which the checkpoint
    # shows module by module; any other key would give some modules other bits or groups.
    dynamic = quant.get("dynamic") or {}
    if any(not str(key).startswith("-:") for key in dynamic):
        raise ValueError("GPTQ 'dynamic' overrides of bits or group size per module are not supported")
    symmetric = quant.get("sym", True) is not False
    if not symmetric and bits == 8:
        raise ValueError("asymmetric 8-bit GPTQ weights (zero points) are not supported; 4-bit ones are")
    # Symmetric weights' zero points are the middle of the range: checked at load, then left out.
    return QuantScheme(
        "gptq",
        _group_block(quant.get("group_size", 128)),
        f"int{bits}",
        packed=bits == 4,
        zero_points=not symmetric,
        zero_point_offset=1 if fmt == "gptq" else 0,
        input_order=quant.get("desc_act") is True,
    )


def _awq(quant: dict[str, Any]) -> QuantScheme:
    if quant.get("bits", 4) != 4:
        raise ValueError(f"AWQ checkpoints of {quant.get('bits')!r}-bit weights are not supported (4-bit "
                         f"ones are)")  # fmt: skip
    # transformers reads the layout from "version" or "format"; "backend": "llm-awq" is MIT's own.
    version = str(quant.get("version") or quant.get("format") or "gemm").lower()
    if version != "gemm" or quant.get("backend") == "llm-awq":
        raise ValueError(f"AWQ layout {quant.get('backend') or version!r} is not supported ('gemm' is)")
    if quant.get("zero_point", True) is False:
        raise ValueError("AWQ checkpoints without zero points are not supported")
    block = _group_block(quant.get("group_size", 128))
    return QuantScheme("awq", block, "int4", packed=True, zero_points=True)


def _group_block(group_size: Any) -> tuple[int, int] | None:
    """A GPTQ or AWQ group size as a block: -1 is one group across the whole input (a scale per
    output row)."""
    return None if group_size == -1 else (1, _positive(group_size, "group_size"))


def _positive(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")
    return value


def _block(value: Any, field: str) -> tuple[int, int]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(f"{field} must be two positive integers, got {value!r}")
    try:
        return _positive(value[0], field), _positive(value[1], field)
    except ValueError:
        raise ValueError(f"{field} must be two positive integers, got {value!r}") from None
