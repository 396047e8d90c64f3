"""A checkpoint's calibrated KV-cache scales, folded into the attention's projections.

FP8 checkpoints with an 8-bit KV cache (llm-compressor's ``kv_cache_scheme``, AutoFP8's releases)
carry a ``k_scale`` and a ``v_scale`` per layer: the cache is to hold ``k / k_scale`` and
``v / v_scale`` in e4m3, so that keys and values past e4m3's range (448) are not clamped and small
ones keep their precision. They are named at the attention module (``self_attn.k_scale``, or
``self_attn.attn.k_scale``), at its projections (``self_attn.k_proj.k_scale``, ``v_proj.v_scale``;
older llm-compressor checkpoints: ``k_proj.output_scale``, ``v_proj.output_scale``), or as one
``self_attn.kv_scale`` for both.

The engine applies them by changing the model, not the kernels: with ``k`` divided by ``k_scale``
and the attention's score scale multiplied by it, every score is the same; with ``v`` divided by
``v_scale``, the attention's output is too, until ``o_proj`` multiplies it back. So the k and v
rows of the fused q|k|v projection are divided by their scales (the k norm's weight instead, where
keys are normalized after the projection, as in Qwen3), and ``o_proj`` is multiplied by
``v_scale``. Every attention kernel then stores and reads the scaled keys and values as it does
unscaled ones. Low-bit projections take the factors on their scales, whose blocks must not
straddle k and v, and LoRA adapters on their B rows. Exact in real arithmetic; a 16-bit weight
takes one more rounding.

They are applied with an 8-bit KV cache only (``kv_cache_dtype="fp8"``), as vLLM applies them.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
from torch import nn

from inferd.config import ModelLoadError
from inferd.layers import quantized
from inferd.layers.linear import Linear
from inferd.layers.norm import RMSNorm
from inferd.models.olmo import OlmoRMSNorm

logger = logging.getLogger(__name__)

# ``model.layers.<i>.self_attn[.attn|.k_proj|.v_proj].<k_scale|v_scale|kv_scale|output_scale>``
_NAME = re.compile(
    r"^model\.layers\.(\d+)\.self_attn\.(?:attn\.|([kv])_proj\.)?(k_scale|v_scale|kv_scale|output_scale)$"
)


def kv_scale_of(name: str) -> tuple[int, str] | None:
    """The layer and which scale (``"k"``, ``"v"`` or ``"kv"``) the checkpoint tensor ``name``
    is, or None for any other tensor."""
    match = _NAME.match(name)
    if match is None:
        return None
    layer, projection, kind = match.groups()
    if kind == "output_scale":  # the k or v projection's output scale is its cache's
        return None if projection is None else (int(layer), projection)
    scale = kind.removesuffix("_scale")
    if projection is not None and scale not in (projection, "kv"):  # e.g. k_proj.v_scale
        return None
    return int(layer), scale


class KVScales:
    """The scales read from a checkpoint, layer by layer."""

    def __init__(self) -> None:
        self.by_layer: dict[int, dict[str, float]] = {}

    def add(self, name: str, layer: int, kind: str, tensor: torch.Tensor) -> None:
        if tensor.numel() != 1:
            raise ModelLoadError(f"KV-cache scale {name!r} has {tensor.numel()} values; one per layer is "
                                 f"supported (per-head scales are not)")  # fmt: skip
        value = float(tensor.float().item())
        if not (math.isfinite(value) and value > 0):
            raise ModelLoadError(f"KV-cache scale {name!r} is {value}; scales must be positive")
        for key in ("k", "v") if kind == "kv" else (kind,):
            known = self.by_layer.setdefault(layer, {})
            if known.get(key, value) != value:
                raise ModelLoadError(f"KV-cache scale {name!r} ({value}) contradicts another {key} scale of "
                                     f"layer {layer} ({known[key]})")  # fmt: skip
            known[key] = value

    def __bool__(self) -> bool:
        return bool(self.by_layer)

    def fold_into(self, model: nn.Module) -> None:
        """Divide each layer's stored keys and values by its scales (see the module's docstring);
        every layer must have both."""
        layers: Any = model.model.layers  # type: ignore[union-attr]
        missing = [i for i in range(len(layers)) if set(self.by_layer.get(i, {})) != {"k", "v"}]
        extra = [i for i in self.by_layer if i >= len(layers)]
        if missing or extra:
            raise ModelLoadError(f"the checkpoint's KV-cache scales do not give a k_scale and a v_scale for "
                                 f"every layer (layers {(missing or extra)[:5]})")  # fmt: skip
        for index, layer in enumerate(layers):
            attention = layer.self_attn
            scales = self.by_layer[index]
            _fold_layer(attention, scales["k"], scales["v"])
        logger.info("applied the checkpoint's calibrated KV-cache scales (%d layers): the 8-bit cache holds "
                    "keys and values divided by them", len(layers))  # fmt: skip


def _fold_layer(attention: Any, k_scale: float, v_scale: float) -> None:
    k_rows = (attention.q_size, attention.kv_size)
    v_rows = (attention.q_size + attention.kv_size, attention.kv_size)
    qkv: Linear = attention.qkv_proj
    k_norm = getattr(attention, "k_norm", None)
    if k_norm is not None:
        # The norm comes after the projection: it would undo the projection's scaling, so it
        # takes it (Gemma 3's norms scale by 1 + weight, which this does not fold).
        if type(k_norm) not in (RMSNorm, OlmoRMSNorm):
            raise ModelLoadError("KV-cache scales are not supported for this architecture's key norms")
        with torch.no_grad():
            k_norm.weight.div_(k_scale)
    else:
        _scale_rows(qkv, k_rows, 1.0 / k_scale)
    _scale_rows(qkv, v_rows, 1.0 / v_scale)
    _scale_rows(attention.o_proj, (0, attention.o_proj.out_features), v_scale, bias=False)
    attention.scale *= k_scale  # every score as before: q . (k / k_scale) * (scale * k_scale)


def _scale_rows(linear: Linear, rows: tuple[int, int], factor: float, bias: bool = True) -> None:
    """Multiply output rows ``rows`` (start, count) of ``linear`` by ``factor`` (its bias too, with
    ``bias``); a low-bit projection's scales of those rows take it, which needs the rows to cover
    whole blocks (a checkpoint that ships q|k|v fused may have blocks across k and v). The factors
    are kept on the projection (``output_row_factors``) for its LoRA adapters."""
    start, count = rows
    if linear.output_row_factors is None:
        linear.output_row_factors = torch.ones(linear.out_features, device=linear.weight.device)
    linear.output_row_factors[start : start + count] *= factor
    with torch.no_grad():
        if linear.weight_block is not None:
            block_rows = linear.weight_block[0]
            if not quantized.spans_whole_blocks(start, count, linear.out_features, block_rows):
                raise ModelLoadError(f"KV-cache scales cannot be folded into blocks of {block_rows} rows "
                                     f"that straddle the keys' or values' rows {start} to "
                                     f"{start + count}")  # fmt: skip
            linear.quant_scale()[start // block_rows : -(-(start + count) // block_rows)].mul_(factor)
        else:
            linear.weight[start : start + count].mul_(factor)
        if bias and linear.bias is not None:
            linear.bias[start : start + count].mul_(factor)
