"""8-bit float copies of a tiny model's folder, stored as the hub's FP8 checkpoints store them.

Written here from the two formats' descriptions, not with the engine's own quantizer, so that a
misreading of either format by the engine shows against transformers, which reads the same folder
with its own code (``accelerate`` for the ``fp8`` method, ``compressed-tensors`` for the other).
"""

from __future__ import annotations

import json
import shutil
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
    # are checked in test_fp8_weights.py).
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
    shutil.copytree(source, folder)
    tensors = load_file(source / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        if not (name.startswith("model.layers.") and name.endswith("_proj.weight")) or module.endswith(skip):
            out[name] = tensor
            continue
        out[name], scale = _quantized(tensor.float(), block)
        out[f"{module}.{scale_name}"] = scale.float()
        if input_scales:
            out[f"{module}.input_scale"] = torch.tensor([0.02])
    save_file(out, folder / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = quant
    (folder / "config.json").write_text(json.dumps(config))
    return folder


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
