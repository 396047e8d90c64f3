"""LoRA adapters in PEFT's format, served beside the base model: each request names its adapter
(or none), and one batch mixes requests of several adapters and of the base model.

An adapter adds ``scale * B @ A`` to some projections' weights (``A``: [rank, in], ``B``: [out,
rank]). Nothing is merged: each projection keeps, per adapter, its ``A`` and ``B`` stacked over
the engine's adapters, and after the base matmul adds ``(x @ A.T) @ B.T`` to the rows of the
requests using that adapter (``LoraWeights.add_to``); the scale is folded into ``B``. The fused
projections (q|k|v, gate|up) take each piece's own pair: their ``A`` rows are stacked and ``B`` is
block-diagonal, so one pair of matmuls serves all the pieces.

Which rows use which adapter is set once a step (``LoraBatch.set_rows``, by the model runner) and
read on the host, so engines with adapters decode without CUDA graphs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from inferd.config import ModelLoadError, read_json_object
from inferd.models.loader import FUSED_SHARDS

# A PEFT target of a fused projection names its piece as checkpoints do (models/loader.py's
# FUSED_SHARDS maps it); these targets are projections of their own name (Phi-3's checkpoints,
# and so its adapters, have q|k|v and gate|up fused, in inferd's row order).
_PLAIN_TARGETS = ("o_proj", "down_proj", "qkv_proj", "gate_up_proj")
# Adapter weights these types are computed with (quantized or 8-bit float ones are refused).
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# PEFT's default lora_alpha (LoraConfig), for a config that leaves it out.
_DEFAULT_ALPHA = 8.0
# PEFT's names: base_model.model.<module>.lora_A.weight / .lora_B.weight
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    scale: float
    # Module name in the checkpoint's model (``model.layers.0.self_attn.q_proj``) -> (A, B).
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]


def read_adapter(name: str, path: Path) -> LoraAdapter:
    """A PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``); what would
    change the answer and is not computed here (DoRA, biases, per-module ranks or scales, extra
    trained modules, replicated layers, activated LoRA, other PEFT methods) is a ModelLoadError
    naming it."""
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"LoRA adapter {name!r}: {path} has no adapter_config.json")
    config = read_json_object(config_file)
    changes_the_answer = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication",
                          "alora_invocation_tokens")  # fmt: skip
    refused = [key for key in changes_the_answer if config.get(key)]
    if config.get("bias", "none") != "none":
        refused.append(f"bias={config['bias']!r}")
    if config.get("peft_type", "LORA") != "LORA":
        refused.append(f"peft_type={config['peft_type']!r}")
    if refused:
        raise ModelLoadError(f"LoRA adapter {name!r}: {', '.join(refused)} not supported")
    try:
        rank = int(config["r"])  # an infinite r (1e400) raises OverflowError
        alpha = float(config.get("lora_alpha", _DEFAULT_ALPHA))
    except (KeyError, TypeError, ValueError, OverflowError):
        raise ModelLoadError(f"LoRA adapter {name!r}: {config_file} needs an integer 'r'") from None
    if rank < 1:
        raise ModelLoadError(f"LoRA adapter {name!r}: rank r must be at least 1, not {rank}")
    if not math.isfinite(alpha):  # every answer through it would be NaN logits, a 500 each
        raise ModelLoadError(f"LoRA adapter {name!r}: lora_alpha must be a finite number, not {alpha}")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise ModelLoadError(f"LoRA adapter {name!r}: {path} has no adapter_model.safetensors")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                module, half = _split_key(name, key)
                halves.setdefault(module, {})[half] = f.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(
            f"LoRA adapter {name!r}: {weights_file} is not a valid safetensors file: {exc}"
        ) from None
    pairs = {}
    for module, found in halves.items():
        if set(found) != {"lora_A", "lora_B"}:
            raise ModelLoadError(f"LoRA adapter {name!r}: {module} lacks its lora_A or lora_B")
        a, b = found["lora_A"], found["lora_B"]
        odd = {str(t.dtype) for t in (a, b) if t.dtype not in _WEIGHT_DTYPES}
        if odd:
            raise ModelLoadError(f"LoRA adapter {name!r}: {module} has weights of {', '.join(sorted(odd))}; "
                                 "float32, float64, float16 or bfloat16 ones are served")  # fmt: skip
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ModelLoadError(
                f"LoRA adapter {name!r}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                f"not of rank {rank}"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            # Its requests would answer nothing but NaNs' tokens: refused as it loads, not served.
            raise ModelLoadError(f"LoRA adapter {name!r}: {module} has weights that are not finite numbers")
        pairs[module] = (a, b)
    if not pairs:
        raise ModelLoadError(f"LoRA adapter {name!r}: {weights_file} holds no LoRA weights")
    return LoraAdapter(name, scale, pairs)


def _split_key(name: str, key: str) -> tuple[str, str]:
    parts = key.split(".")
    if (
        not key.startswith(_PREFIX)
        or len(parts) < 4
        or parts[-1] != "weight"
        or parts[-2] not in ("lora_A", "lora_B")
    ):
        raise ModelLoadError(f"LoRA adapter {name!r}: unexpected tensor {key!r}")
    return ".".join(parts[2:-2]), parts[-2]


class LoraBatch:
    """Which of a step's rows use which adapter, shared by every projection with adapters."""

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.slots = {name: slot for slot, name in enumerate(names)}
        self.device = device
        # (adapter slot, the rows using it; None: every row of the step).
        self.groups: list[tuple[int, torch.Tensor | None]] = []

    def set_rows(self, adapters: list[tuple[str | None, int]]) -> None:
        """The step's sequences in row order, each as (its adapter or None, its number of rows)."""
        rows: dict[int, list[int]] = {}
        start = 0
        for adapter, count in adapters:
            if adapter is not None:
                rows.setdefault(self.slots[adapter], []).extend(range(start, start + count))
            start += count
        self.groups = [
            (slot, None if len(indices) == start else self._on_device(indices))
            for slot, indices in rows.items()
        ]

    def _on_device(self, indices: list[int]) -> torch.Tensor:
        """On a GPU through pinned memory without a wait, so the host queues the step at once (a
        plain copy would wait for the device's earlier work)."""
        rows = torch.tensor(indices, dtype=torch.long)
        if self.device.type != "cuda":
            return rows
        return rows.pin_memory().to(self.device, non_blocking=True)


class LoraWeights:
    """One projection's adapters: ``a`` [adapters, rank, in] and ``b`` [adapters, out, rank], the
    rank the largest of the engine's adapters' (zero-padded) and ``b`` scaled. Not a module: they
    are made on the model's device and are no part of its parameters or checkpoint."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, batch: LoraBatch) -> None:
        self.a = a
        self.b = b
        self.batch = batch

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> None:
        for slot, rows in self.batch.groups:
            a, b = self.a[slot], self.b[slot]
            if rows is None:
                out += (x @ a.T) @ b.T
            else:
                out.index_add_(0, rows, (x.index_select(0, rows) @ a.T) @ b.T)


def attach_adapters(model: nn.Module, adapters: list[LoraAdapter], qkv_rows: list[int]) -> LoraBatch:
    """Give every projection an adapter targets its ``LoraWeights``; returns the batch they share.
    ``qkv_rows``: the q, k and v pieces' output rows of the fused ``qkv_proj`` (gate|up's are
    two halves)."""
    from inferd.layers.linear import Linear

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = LoraBatch([adapter.name for adapter in adapters], device)
    modules = dict(model.named_modules())
    detach_adapters(model)  # a projection no adapter targets any more keeps none
    # projection -> per adapter: [(piece, A, B)]
    targets: dict[str, list[list[tuple[int | None, torch.Tensor, torch.Tensor]]]] = {}
    for slot, adapter in enumerate(adapters):
        for module, (a, b) in adapter.pairs.items():
            owner, last = module.rsplit(".", 1) if "." in module else ("", module)
            if last in FUSED_SHARDS:
                fused, piece = FUSED_SHARDS[last]
                projection, index = f"{owner}.{fused}", piece
            elif last in _PLAIN_TARGETS:
                projection, index = module, None
            else:
                raise ModelLoadError(f"LoRA adapter {adapter.name!r}: target {module!r} is not supported "
                                     f"(q/k/v/o and gate/up/down projections are)")  # fmt: skip
            if not isinstance(modules.get(projection), Linear):
                raise ModelLoadError(f"LoRA adapter {adapter.name!r}: the model has no {module!r}")
            per_adapter = targets.setdefault(projection, [[] for _ in adapters])
            per_adapter[slot].append((index, a, b * adapter.scale))
    for projection, per_adapter in targets.items():
        linear = modules[projection]
        assert isinstance(linear, Linear)
        out_features, in_features = linear.out_features, linear.in_features  # the weight may be packed
        pieces = qkv_rows if projection.endswith("qkv_proj") else [out_features // 2] * 2
        rank = max(sum(a.shape[0] for _, a, _ in pairs) for pairs in per_adapter)
        a_stack = torch.zeros(len(adapters), rank, in_features, dtype=dtype, device=device)
        b_stack = torch.zeros(len(adapters), out_features, rank, dtype=dtype, device=device)
        for slot, pairs in enumerate(per_adapter):
            used = 0
            for index, a, b in pairs:
                rows = slice(0, out_features) if index is None else _piece(pieces, index)
                r = a.shape[0]
                if a.shape[1] != in_features or b.shape[0] != rows.stop - rows.start:
                    raise ModelLoadError(
                        f"LoRA adapter {adapters[slot].name!r}: {projection} piece {index} takes A "
                        f"[{r}, {in_features}] and B [{rows.stop - rows.start}, {r}], got {tuple(a.shape)} "
                        f"and {tuple(b.shape)}"
                    )
                a_stack[slot, used : used + r] = a.to(dtype)
                b_stack[slot, rows, used : used + r] = b.to(dtype)
                used += r
        if linear.output_row_factors is not None:  # the rows' KV-cache scales, as the weight took them
            b_stack.mul_(linear.output_row_factors.to(dtype)[None, :, None])
        linear.lora = LoraWeights(a_stack, b_stack, batch)
    return batch


def detach_adapters(model: nn.Module) -> None:
    """Every projection back to the base model's alone."""
    from inferd.layers.linear import Linear

    for module in model.modules():
        if isinstance(module, Linear):
            module.lora = None


def _piece(piece_rows: list[int], index: int) -> slice:
    start = sum(piece_rows[:index])
    return slice(start, start + piece_rows[index])
