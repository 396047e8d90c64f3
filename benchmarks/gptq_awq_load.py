"""What turning GPTQ and AWQ tensors into the engine's packed layout costs at load, on the CPU.

    python benchmarks/gptq_awq_load.py [--threads 2] [--rounds 3]

One decoder layer of Llama-3.1-8B's shape (q 4096 x 4096, k and v 1024 x 4096, o 4096 x 4096, gate
and up 14336 x 4096, down 4096 x 14336), groups of 128, random words: the seconds
``models/gptq_awq.py`` takes for the layer's ``qweight``, ``qzeros``, ``scales`` (and ``g_idx``),
and for a checkpoint in activation order the column reordering after the fill
(``order_input_columns``), median of the rounds; times 32 layers for the whole model.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from inferd.layers import quantized
from inferd.layers.linear import Linear
from inferd.models import gptq_awq
from inferd.quant_config import QuantScheme

GROUP = 128
LAYERS = 32
# Llama-3.1-8B's projections, (out, in).
SHAPES = {
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
SCHEMES = {
    "GPTQ 4-bit": QuantScheme("gptq", (1, GROUP), "int4", packed=True, zero_points=True, zero_point_offset=1),
    "GPTQ 4-bit, activation order": QuantScheme(
        "gptq", (1, GROUP), "int4", packed=True, zero_points=True, zero_point_offset=1, input_order=True
    ),
    "GPTQ 8-bit": QuantScheme("gptq", (1, GROUP), "int8", zero_point_offset=1),
    "AWQ": QuantScheme("awq", (1, GROUP), "int4", packed=True, zero_points=True),
}


def _random_words(rows: int, columns: int) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31 - 1, (rows, columns), dtype=torch.int32)


def _layer_tensors(scheme: QuantScheme) -> dict[str, torch.Tensor]:
    per_word = 32 // scheme.bits
    tensors: dict[str, torch.Tensor] = {}
    for name, (out, inp) in SHAPES.items():
        groups = inp // GROUP
        awq = scheme.method == "awq"
        words = _random_words(inp, out // 8) if awq else _random_words(inp // per_word, out)
        zeros = torch.full((groups, out // per_word), 0x77777777 if scheme.bits == 4 else 0x7F7F7F7F)
        tensors[f"{name}.qweight"] = words
        tensors[f"{name}.qzeros"] = zeros.to(torch.int32)
        tensors[f"{name}.scales"] = torch.rand(groups, out, dtype=torch.float16)
        if scheme.method == "gptq":
            order = torch.randperm(inp) if scheme.input_order else torch.arange(inp)
            g_idx = torch.empty(inp, dtype=torch.int32)
            g_idx[order] = (torch.arange(inp) // GROUP).to(torch.int32)
            tensors[f"{name}.g_idx"] = g_idx
    return tensors


def _convert(tensors: dict[str, torch.Tensor], scheme: QuantScheme) -> float:
    start = time.perf_counter()
    held = dict(kv for name, t in tensors.items() for kv in gptq_awq.engine_tensors(name, t, scheme))
    if scheme.input_order:
        for name, (out, inp) in SHAPES.items():
            linear = Linear(inp, out, bias=False, device="meta")
            dtype = quantized.storage_dtype(scheme.values, scheme.packed)
            quantized.hold_quantized(linear.to_empty(device="cpu"), (1, GROUP), (out, inp // GROUP), dtype)
            linear.weight.data = held[f"{name}.weight_packed"]
            linear.register_parameter("g_idx", torch.nn.Parameter(held[f"{name}.g_idx"], requires_grad=False))
            gptq_awq.order_input_columns(linear, name)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'checkpoint':32} {'s / layer':>10} {'s / 32 layers':>14}")
    for label, scheme in SCHEMES.items():
        tensors = _layer_tensors(scheme)
        seconds = statistics.median(_convert(tensors, scheme) for _ in range(args.rounds))
        print(f"{label:32} {seconds:10.3f} {seconds * LAYERS:14.1f}")


if __name__ == "__main__":
    main()
