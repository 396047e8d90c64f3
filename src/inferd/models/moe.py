"""Routed expert MLPs (a sparse mixture of experts), as Mixtral, Qwen2-MoE and Qwen3-MoE use them.

A router scores every expert for each token; the token goes through its ``top_k`` best, and their
outputs are summed, weighted by the router's softmax (renormalised over the chosen ones where the
model asks). Qwen2-MoE adds a shared expert every token takes, scaled by a sigmoid gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inferd.config import MoEConfig
from inferd.layers import quantized
from inferd.layers.activation import silu_and_mul
from inferd.layers.linear_operands import WeightScale
from inferd.models.mlp import MLP, AllReduce, reduced
from inferd.quant_config import QuantScheme


def route(router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's chosen experts, [tokens, top_k], and their weights in float32: the softmax over
    all experts (computed in float32, as Hugging Face does), kept for the chosen ones only."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = probs.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


class Experts(nn.Module):
    """``num_experts`` SiLU-gated MLPs in two stacked tensors: gate|up, [experts, 2 * intermediate,
    hidden], and down, [experts, hidden, intermediate] (the loader fills each expert's slice from
    its own checkpoint tensors).

    With low-bit weights (``hold_low_bit``: an FP8, W8, GPTQ, AWQ or W4A16 checkpoint's experts:
    e4m3, int8, or 4-bit integers packed eight to an int32 word along each row, [experts, rows,
    ceil(columns / 8)]), each stack has float32 scales beside it, ``gate_up_proj_scale`` and
    ``down_proj_scale`` [experts, blocks down, blocks across], one per block (``weight_blocks``)
    of each expert's matrix, and for asymmetric integers int8 zero points of the same shape
    (``gate_up_proj_zero_point``, ``down_proj_zero_point``); an expert's weights are widened to
    the activations' dtype when it runs (``layers/quantized.py``). The Triton grouped matmul does
    not read them."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        # Run on layers/triton_moe.py (the engine option triton_moe), without a host read.
        self.use_triton = False
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # Each stack's input width: packed 4-bit words do not show it.
        self.in_features = {"gate_up_proj": hidden_size, "down_proj": intermediate_size}
        # Low-bit stacks: each stack's (rows, columns) of an expert's matrix one scale covers.
        self.weight_blocks: dict[str, tuple[int, int]] = {}

    def hold_low_bit(self, scheme: QuantScheme) -> None:
        """Hold both stacks in ``scheme``'s values (``quantized.storage_dtype``) with float32
        scales in its blocks of each expert's matrix (ones, to be filled), and with its zero
        points, zeros to be filled."""
        dtype = quantized.storage_dtype(scheme.values, scheme.packed)
        for name in ("gate_up_proj", "down_proj"):
            stack = getattr(self, name)
            experts, rows, columns = stack.shape
            device = stack.device
            shape = (experts, rows, -(-columns // 8)) if dtype == torch.int32 else (experts, rows, columns)
            weight = torch.empty(shape, dtype=dtype, device=device)
            setattr(self, name, nn.Parameter(weight, requires_grad=False))
            scale_shape = (experts, *scheme.scale_shape(rows, columns))
            scale = torch.ones(scale_shape, dtype=torch.float32, device=device)
            self.register_parameter(f"{name}_scale", nn.Parameter(scale, requires_grad=False))
            if scheme.zero_points:
                zero = torch.zeros(scale_shape, dtype=torch.int8, device=device)
                self.register_parameter(f"{name}_zero_point", nn.Parameter(zero, requires_grad=False))
            self.weight_blocks[name] = scheme.block_of(rows, columns)

    def quantize_in_place(self, scheme: QuantScheme) -> None:
        """Both stacks as ``scheme``'s values and scales, expert by expert, with zero points of 0
        where it has them (random weights in a low-bit checkpoint's shape, and the engine option
        ``quantization="fp8"``)."""
        wide = {name: getattr(self, name).data for name in ("gate_up_proj", "down_proj")}
        self.hold_low_bit(scheme)
        with torch.no_grad():
            for name, stack in wide.items():
                held = getattr(self, name)
                for expert in range(self.num_experts):
                    values, scale = quantized.quantize(stack[expert], self.weight_blocks[name], scheme.values)
                    if held.dtype == torch.int32:
                        values = quantized.pack_int32(values, 4)
                    held[expert].copy_(values)
                    getattr(self, f"{name}_scale")[expert].copy_(scale)

    def _weight(self, name: str, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert ``expert``'s matrix of stack ``name``, widened with its scales (and zero points)
        if it is low-bit."""
        weight = getattr(self, name)[expert]
        block = self.weight_blocks.get(name)
        if block is None:
            return weight
        scale = getattr(self, f"{name}_scale")[expert]
        zero = getattr(self, f"{name}_zero_point", None)
        how = WeightScale(
            scale,
            block,
            zero_point=None if zero is None else zero[expert],
            columns=self.in_features[name] if weight.dtype == torch.int32 else None,
        )
        return quantized.dequantize(weight, how, dtype)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """``sum_j weights[t, j] * expert[experts[t, j]](x[t])`` for every token ``t``.

        The (token, expert) pairs are sorted by expert, so each expert with work runs one pair of
        matmuls over all its tokens at once. Which experts have work, and how much, the host reads
        from the device: one synchronisation per layer, which is why decode of these models runs
        as CUDA graphs only on the Triton path (``use_triton``), which needs no such read."""
        if self.use_triton:
            from inferd.layers import triton_moe

            return triton_moe.routed_experts(x, self.gate_up_proj, self.down_proj, weights, experts)
        num_tokens, top_k = experts.shape
        pair_experts = experts.reshape(-1)
        order = torch.argsort(pair_experts, stable=True)
        counts = torch.bincount(pair_experts, minlength=self.num_experts).tolist()
        sorted_inputs = x[order // top_k]
        sorted_outputs = torch.empty_like(sorted_inputs)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                hidden = silu_and_mul(
                    F.linear(sorted_inputs[rows], self._weight("gate_up_proj", expert, x.dtype))
                )
                sorted_outputs[rows] = F.linear(hidden, self._weight("down_proj", expert, x.dtype))
                start += count
        pair_outputs = torch.empty_like(sorted_outputs)
        pair_outputs[order] = sorted_outputs
        weighted = pair_outputs.view(num_tokens, top_k, -1).float() * weights.unsqueeze(-1)
        return weighted.sum(dim=1).to(x.dtype)


class SparseMoE(nn.Module):
    """A decoder layer's MLP as routed experts (and Qwen2-MoE's gated shared expert). Parameter
    names follow the Qwen checkpoints (``gate`` is the router); the loader maps Mixtral's."""

    def __init__(self, hidden_size: int, moe: MoEConfig) -> None:
        super().__init__()
        self.top_k = moe.top_k
        self.normalize_top_k = moe.normalize_top_k
        self.gate = nn.Linear(hidden_size, moe.num_experts, bias=False)
        self.experts = Experts(moe.num_experts, hidden_size, moe.expert_intermediate_size)
        self.shared_expert: MLP | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = MLP(hidden_size, moe.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        # Under tensor parallelism each rank holds a slice of every expert (and of the shared one):
        # their partial outputs are summed once, here.
        self.all_reduce: AllReduce | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output for ``x``, the layer's normed hidden states [tokens, hidden]."""
        weights, experts = route(self.gate(x), self.top_k, self.normalize_top_k)
        out = self.experts(x, weights, experts)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            shared = self.shared_expert(self.shared_expert.gate_up_proj(x))
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared
        return reduced(out, self.all_reduce)
