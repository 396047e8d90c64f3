"""Low-bit copies of a tiny model's folder, stored as the hub's FP8, W4A16, W8A16 and W8A8
checkpoints store them.

Written here from the formats' descriptions, not with the engine's own quantizer, so that a
misreading of a format by the engine shows against transformers, which reads the same folder with
its own code (``accelerate`` for the ``fp8`` method, ``compressed-tensors`` for the others).
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

E4M3_MAX = 448.0


def _compressed_tensors(strategy: str, activations: dict) -> dict:
    """llm-compressor's quantization_config for 8-bit float weights of ``strategy``."""
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": activations}
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {"group_0": group}}  # fmt: skip


_FP8_ACTIVATIONS = {"num_bits": 8, "type": "float", "symmetric": True}

# name -> (quantization_config, weight block (rows, columns) or None for one scale per row, or
# "tensor" for one per tensor; the scale's checkpoint name; whether static input scales ride along)
LAYOUTS: dict[str, tuple[dict, object, str, bool]] = {
    # Qwen3's and DeepSeek's FP8 releases: 128 x 128 blocks there, 16 x 32 for the tiny model's
    # widths (transformers refuses blocks that do not divide a weight; the engine's partial ones
    # are checked in test_quantized_weights.py).
    "fp8-block": (
        {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [16, 32]},
        (16, 32),
        "weight_scale_inv",
        False,
    ),
    # llm-compressor's FP8-dynamic: one scale per output channel, activations' per token at run time.
    "ct-channel": (
        _compressed_tensors("channel", {**_FP8_ACTIVATIONS, "strategy": "token", "dynamic": True}),
        None,
        "weight_scale",
        False,
    ),
    # llm-compressor's FP8 with static activation scales: one scale per tensor.
    "ct-tensor": (
        _compressed_tensors("tensor", {**_FP8_ACTIVATIONS, "strategy": "tensor", "dynamic": False}),
        "tensor",
        "weight_scale",
        True,
    ),
}


def _quantized(weight: torch.Tensor, block: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` as e4m3 and its scales (weight ~= fp8 * scale), per ``block``."""
    rows, columns = weight.shape
    if block == "tensor":
        scale = weight.abs().max() / E4M3_MAX
        return (weight / scale).to(torch.float8_e4m3fn), scale.reshape(1)
    if block is None:
        scale = weight.abs().amax(dim=1, keepdim=True) / E4M3_MAX
        return (weight / scale).to(torch.float8_e4m3fn), scale
    assert isinstance(block, tuple)
    block_rows, block_columns = block
    scale = torch.empty(-(-rows // block_rows), -(-columns // block_columns))
    out = torch.empty(rows, columns, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rs = slice(i * block_rows, (i + 1) * block_rows)
            cs = slice(j * block_columns, (j + 1) * block_columns)
            scale[i, j] = weight[rs, cs].abs().max() / E4M3_MAX
            out[rs, cs] = (weight[rs, cs] / scale[i, j]).to(torch.float8_e4m3fn)
    return out, scale


def _rewrite_projections(
    source: Path,
    folder: Path,
    quant: dict,
    encode: Callable[[str, torch.Tensor], dict],
    skip: tuple[str, ...],
) -> Path:
    """A copy of ``source`` whose layers' projections (not the LM head, nor any whose name ends
    with one of ``skip``) are replaced by ``encode(module, weight)``'s tensors, with ``quant`` as
    its quantization_config."""
    shutil.copytree(source, folder)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        module = name.removesuffix(".weight")
        if not (name.startswith("model.layers.") and name.endswith("_proj.weight")) or module.endswith(skip):
            out[name] = tensor
        else:
            out.update(encode(module, tensor.float()))
    save_file(out, folder / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = quant
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def make_fp8_checkpoint(
    source: Path,
    folder: Path,
    layout: str,
    skip: tuple[str, ...] = (),
    block_size: tuple[int, int] | None = None,
) -> Path:
    """A copy of ``source`` whose layers' projections (not the LM head, nor any whose name ends
    with one of ``skip``) are stored as ``layout`` stores them (the fp8 method's with blocks of
    ``block_size`` where given)."""
    quant, block, scale_name, input_scales = LAYOUTS[layout]
    if block_size is not None:
        quant, block = {**quant, "weight_block_size": list(block_size)}, block_size

    def encode(module: str, weight: torch.Tensor) -> dict:
        values, scale = _quantized(weight, block)
        tensors = {f"{module}.weight": values, f"{module}.{scale_name}": scale.float()}
        if input_scales:
            tensors[f"{module}.input_scale"] = torch.tensor([0.02])
        return tensors

    return _rewrite_projections(source, folder, quant, encode, skip)


def make_checkpoint(source: Path, folder: Path, layout: str, skip: tuple[str, ...] = ()) -> Path:
    """``source`` stored as ``layout`` of LAYOUTS (8-bit floats) or INT_LAYOUTS (integers)."""
    if layout in LAYOUTS:
        return make_fp8_checkpoint(source, folder, layout, skip)
    return make_int_checkpoint(source, folder, layout, skip)


def widened_copy(folder: Path, target: Path) -> Path:
    """A copy of the 8-bit float ``folder`` with every weight widened to float32 (``fp8 * scale``
    over each scale's block, partial blocks at the edges too) and no quantization_config: the
    model an 8-bit float checkpoint stands for, in a form transformers reads without help."""
    shutil.copytree(folder, target)
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    quant = config.pop("quantization_config")
    block = quant.get("weight_block_size")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(("_scale", "_scale_inv")):
            continue
        scale = tensors.get(f"{name}_scale_inv", tensors.get(f"{name}_scale"))
        if scale is None:
            out[name] = tensor
            continue
        rows, columns = tensor.shape
        if block is not None:
            scale = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :columns]
        out[name] = tensor.float() * scale.float()
    save_file(out, target / "model.safetensors")
    (target / "config.json").write_text(json.dumps(config))
    return target


def _integer_config(
    fmt: str, bits: int, strategy: str, activations: dict | None, symmetric: bool = True
) -> dict:
    """llm-compressor's quantization_config for ``bits``-bit integer weights."""
    weights = {
        "num_bits": bits,
        "type": "int",
        "strategy": strategy,
        "symmetric": symmetric,
        "dynamic": False,
    }
    if strategy == "group":
        weights["group_size"] = INT_GROUP
    group = {"targets": ["Linear"], "weights": weights, "input_activations": activations}
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "ignore": ["lm_head"], "config_groups": {"group_0": group}}  # fmt: skip


# Groups of 32 input columns: two and four groups along the tiny model's 64- and 128-wide inputs.
INT_GROUP = 32
_INT8_TOKENS = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}
# name -> (quantization_config, bits, the scales' strategy ("group" of INT_GROUP columns,
# "channel" or "tensor"), packed into int32 words, with zero points)
INT_LAYOUTS: dict[str, tuple[dict, int, str, bool, bool]] = {
    # W4A16: 4-bit integers, a scale per group of columns, packed eight to a word.
    "ct-w4a16": (_integer_config("pack-quantized", 4, "group", None), 4, "group", True, False),
    # llm-compressor's AWQ output: the same with a zero point per group (packed down the rows).
    "ct-w4a16-asym": (
        _integer_config("pack-quantized", 4, "group", None, symmetric=False),
        4,
        "group",
        True,
        True,
    ),
    # One scale and one zero point per tensor (compressed-tensors stores such a zero point unpacked).
    "ct-w4a16-tensor-asym": (
        _integer_config("pack-quantized", 4, "tensor", None, symmetric=False),
        4,
        "tensor",
        True,
        True,
    ),
    # W8A16: 8-bit integers, a scale per output channel, packed four to a word.
    "ct-w8a16": (_integer_config("pack-quantized", 8, "channel", None), 8, "channel", True, False),
    # W8A8: int8 weights as they are, a scale per channel (int8 activations per token, unapplied).
    "ct-w8a8": (_integer_config("int-quantized", 8, "channel", _INT8_TOKENS), 8, "channel", False, False),
}


def _integers(
    weight: torch.Tensor, bits: int, strategy: str, asymmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``weight`` as signed ``bits``-bit integers (in int8), their scales and, ``asymmetric``,
    zero points, per group of INT_GROUP columns, per row or per tensor (``strategy``): weight ~=
    (values - zero) * scale."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rows, columns = weight.shape
    if strategy == "tensor":
        blocks = weight.reshape(1, 1, rows * columns)
    else:
        size = INT_GROUP if strategy == "group" else columns
        blocks = weight.view(rows, columns // size, size)
    if asymmetric:  # the block's range onto low..high
        smallest, largest = blocks.amin(dim=2), blocks.amax(dim=2)
        scale = (largest - smallest).clamp(min=1e-8) / (high - low)
        zero = (low - smallest / scale).round().clamp(low, high)
    else:
        scale, zero = blocks.abs().amax(dim=2) / high, torch.zeros(blocks.shape[:2])
    values = (blocks / scale[:, :, None] + zero[:, :, None]).round().clamp(low, high).view(rows, columns)
    return values.to(torch.int8), scale, zero.to(torch.int8) if asymmetric else None


def packed_integers(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Each row's values, each plus 2**(bits-1), packed 32 // bits to an int32 word, the first in
    the lowest bits (a word's bits computed in int64 and wrapped into int32)."""
    per_word = 32 // bits
    rows, columns = values.shape
    unsigned = (values.to(torch.int64) + 2 ** (bits - 1)).view(rows, columns // per_word, per_word)
    words = torch.zeros(rows, columns // per_word, dtype=torch.int64)
    for i in range(per_word):
        words |= unsigned[:, :, i] << (bits * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def make_int_checkpoint(
    source: Path, folder: Path, layout: str, skip: tuple[str, ...] = (), widened: Path | None = None
) -> Path:
    """A copy of ``source`` whose layers' projections (not the LM head, nor any whose name ends
    with one of ``skip``) are stored as ``layout`` (INT_LAYOUTS) stores them; at ``widened``, if
    given, the model it stands for, each weight ``(values - zero) * scale`` in float32 with the
    scales as stored, as a plain folder (for the models whose projections transformers does not
    read through compressed-tensors: a mixture's stacked experts)."""
    quant, bits, strategy, packed, asymmetric = INT_LAYOUTS[layout]
    float_weights: dict[str, torch.Tensor] = {}

    def encode(module: str, weight: torch.Tensor) -> dict:
        values, scale, zero = _integers(weight, bits, strategy, asymmetric)
        stored_scale = scale.to(torch.bfloat16).float()
        shift = zero.float() if zero is not None else torch.zeros_like(stored_scale)
        if strategy != "tensor":  # one scale (and zero point) per group of columns or per row
            size = weight.shape[1] // scale.shape[1]
            stored_scale, shift = stored_scale.repeat_interleave(size, 1), shift.repeat_interleave(size, 1)
        float_weights[f"{module}.weight"] = (values.float() - shift) * stored_scale
        if strategy == "tensor":  # one of each, as compressed-tensors stores them
            scale, zero = scale.reshape(1), None if zero is None else zero.reshape(1)
        tensors = {f"{module}.weight_scale": scale.to(torch.bfloat16).float()}
        if packed:
            tensors[f"{module}.weight_packed"] = packed_integers(values, bits)
            tensors[f"{module}.weight_shape"] = torch.tensor(weight.shape)
        else:
            tensors[f"{module}.weight"] = values
        if zero is not None and strategy == "tensor":
            tensors[f"{module}.weight_zero_point"] = zero
        elif zero is not None:  # packed down the output rows
            tensors[f"{module}.weight_zero_point"] = (
                packed_integers(zero.t().contiguous(), bits).t().contiguous()
            )
        return tensors

    _rewrite_projections(source, folder, quant, encode, skip)
    if widened is not None:
        _write_widened(source, widened, float_weights)
    return folder


def _write_widened(source: Path, widened: Path, float_weights: dict[str, torch.Tensor]) -> None:
    """A copy of ``source`` with ``float_weights`` in place of its own."""
    shutil.copytree(source, widened)
    tensors = load_file(source / "model.safetensors")
    save_file({**tensors, **float_weights}, widened / "model.safetensors")


# GPTQ's and AWQ's own layouts (quant_method "gptq" / "awq"): name -> quantization_config, as
# Qwen's GPTQ-Int4, GPTQ-Int8 and AWQ releases and GPTQModel write it, with groups of INT_GROUP.
_GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": INT_GROUP, "desc_act": False, "sym": True,
         "damp_percent": 0.01, "true_sequential": True}  # fmt: skip
GPTQ_AWQ_LAYOUTS: dict[str, dict] = {
    "gptq-int4": _GPTQ,
    # Asymmetric, in the first format (zero points stored minus one) and in GPTQModel's second.
    "gptq-int4-asym": {**_GPTQ, "sym": False},
    "gptq-int4-asym-v2": {**_GPTQ, "sym": False, "checkpoint_format": "gptq_v2"},
    "gptq-int8": {**_GPTQ, "bits": 8},
    # One group across each input: a scale per output channel.
    "gptq-int4-channel": {**_GPTQ, "group_size": -1},
    # Quantized in activation order: each group is INT_GROUP columns from anywhere along the input.
    "gptq-int4-act-order": {**_GPTQ, "sym": False, "desc_act": True},
    "gptq-int8-act-order": {**_GPTQ, "bits": 8, "desc_act": True},
    "awq": {
        "quant_method": "awq",
        "bits": 4,
        "group_size": INT_GROUP,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    },  # fmt: skip
}
# AWQ's order of eight output columns in a word: the k-th 4-bit field holds column AWQ_ORDER[k].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# The projections that read one input (GPTQ quantizes them in one order, from that input).
_SAME_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
               "up_proj": "gate_up"}  # fmt: skip


def activation_order(module: str, columns: int) -> torch.Tensor:
    """The order GPTQ's ``desc_act`` would quantize ``module``'s input columns in: a permutation
    drawn from the name of the input it reads, so q, k and v (and gate and up) share one."""
    layer, projection = module.rsplit(".", 1)
    key = f"{layer}.{_SAME_INPUT.get(projection, projection)}"
    return torch.randperm(columns, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))


def _pack_words(unsigned: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Each row's unsigned values packed 32 // bits to an int32 word, field k (from the lowest bits)
    holding the word's value ``order[k]`` (in order without one)."""
    per_word = 32 // bits
    rows, columns = unsigned.shape
    grouped = unsigned.to(torch.int64).view(rows, columns // per_word, per_word)
    words = torch.zeros(rows, columns // per_word, dtype=torch.int64)
    for k in range(per_word):
        words |= grouped[:, :, order[k] if order else k] << (bits * k)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def make_gptq_awq_checkpoint(
    source: Path, folder: Path, layout: str, widened: Path, zero_bias: bool = False
) -> Path:
    """``source`` stored as ``layout`` (GPTQ_AWQ_LAYOUTS) stores it, and at ``widened`` the model it
    stands for, each weight ``(q - z) * scale`` in float32 with the scales as stored (float16), as
    a plain folder transformers reads. ``zero_bias``: a bias of zeros beside every projection
    without one, as GPTQ's quantizers write them."""
    quant = GPTQ_AWQ_LAYOUTS[layout]
    bits, awq = quant["bits"], quant["quant_method"] == "awq"
    asymmetric = awq or quant["sym"] is False
    middle = 2 ** (bits - 1)
    float_weights: dict[str, torch.Tensor] = {}
    biases = {name for name in load_file(source / "model.safetensors") if name.endswith("_proj.bias")}

    def encode(module: str, weight: torch.Tensor) -> dict:
        strategy = "channel" if quant["group_size"] == -1 else "group"
        # In activation order, groups are runs of the permuted columns; the values go back to the
        # checkpoint's column order, and g_idx says each column's group.
        order = activation_order(module, weight.shape[1]) if quant.get("desc_act") else None
        if order is not None:
            weight = weight[:, order]
        if asymmetric:  # the first group of row 0 all positive: its zero point is 0
            weight = weight.clone()
            weight[0, :INT_GROUP] = weight[0, :INT_GROUP].abs() + 1e-3
        values, scale, zero = _integers(weight, bits, strategy, asymmetric)
        scale = scale.half()
        q = values.to(torch.int64) + middle  # unsigned
        signed_zero = zero if zero is not None else torch.zeros_like(scale, dtype=torch.int8)
        z = signed_zero.to(torch.int64) + middle
        group = weight.shape[1] if quant["group_size"] == -1 else INT_GROUP
        wide = (q - z.repeat_interleave(group, 1)).float() * scale.float().repeat_interleave(group, 1)
        groups = torch.arange(weight.shape[1]) // group
        if order is not None:  # back to the checkpoint's column order
            q, wide, groups = q[:, order.argsort()], wide[:, order.argsort()], groups[order.argsort()]
        float_weights[f"{module}.weight"] = wide
        tensors = {f"{module}.scales": scale.t().contiguous()}
        if awq:  # [in, out / 8] and [groups, out / 8], AWQ's order
            tensors[f"{module}.qweight"] = _pack_words(q.t().contiguous(), 4, AWQ_ORDER)
            tensors[f"{module}.qzeros"] = _pack_words(z.t().contiguous(), 4, AWQ_ORDER)
        else:  # [in / per_word, out] packed down the input, zeros [groups, out / per_word]
            tensors[f"{module}.qweight"] = _pack_words(q, bits).t().contiguous()
            zero_words = _pack_words(z.t().contiguous(), bits)
            if quant.get("checkpoint_format", "gptq") == "gptq":
                # The first format: one taken from every field of each word at once (a zero point
                # of 0 borrows from the field above), as GPTQModel writes it.
                ones = sum(1 << shift for shift in range(0, 32, bits))
                wrapped = (zero_words.to(torch.int64) - ones) & 0xFFFFFFFF
                zero_words = torch.where(wrapped >= 2**31, wrapped - 2**32, wrapped).to(torch.int32)
            tensors[f"{module}.qzeros"] = zero_words
            tensors[f"{module}.g_idx"] = groups.to(torch.int32)
        if zero_bias and f"{module}.bias" not in biases:
            tensors[f"{module}.bias"] = torch.zeros(weight.shape[0], dtype=torch.float16)
        return tensors

    _rewrite_projections(source, folder, quant, encode, ())
    _write_widened(source, widened, float_weights)
    return folder
