"""Hugging Face architecture name -> model class, imported lazily."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from inferd.attention.base import AttentionBackend, AttentionMetadata
from inferd.config import ModelLoadError


class CausalLM(Protocol):
    """What the model runner needs of a model class."""

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def enable_triton_ops(
        self,
        enabled: bool,
        linear: bool = False,
        fused_linear: bool = False,
        tiled_linear: bool = False,
        decode_rotary: bool = False,
        moe: bool = False,
    ) -> None: ...

    def set_all_reduce(self, all_reduce: Callable[[torch.Tensor], None]) -> None: ...


_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("inferd.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("inferd.models.llama", "LlamaForCausalLM"),
    # Mistral's layers, each sliding or not as its config's layer_types say.
    "MinistralForCausalLM": ("inferd.models.llama", "LlamaForCausalLM"),
    # Llama's layers with q/k/v biases (and an o_proj one where attention_out_bias says).
    "SeedOssForCausalLM": ("inferd.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("inferd.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("inferd.models.llama", "LlamaForCausalLM"),
    # Llama's layers with q|k|v and gate|up stored fused in the checkpoint, which the loader takes.
    "Phi3ForCausalLM": ("inferd.models.llama", "LlamaForCausalLM"),
    # Llama's attention with routed experts in place of the MLP (models/moe.py).
    "MixtralForCausalLM": ("inferd.models.llama", "LlamaForCausalLM"),
    "Qwen2MoeForCausalLM": ("inferd.models.llama", "LlamaForCausalLM"),
    "Qwen3MoeForCausalLM": ("inferd.models.llama", "LlamaForCausalLM"),
    # Llama's layers, some without the rotary (config.ModelConfig.layer_rope).
    "SmolLM3ForCausalLM": ("inferd.models.llama", "LlamaForCausalLM"),
    # Llama's layers with four scales (config.GraniteScales).
    "GraniteForCausalLM": ("inferd.models.llama", "LlamaForCausalLM"),
    "GemmaForCausalLM": ("inferd.models.gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("inferd.models.gemma", "GemmaForCausalLM"),
    "Gemma3ForCausalLM": ("inferd.models.gemma", "GemmaForCausalLM"),
    "Olmo2ForCausalLM": ("inferd.models.olmo", "OlmoForCausalLM"),
    "Olmo3ForCausalLM": ("inferd.models.olmo", "OlmoForCausalLM"),
    "Exaone4ForCausalLM": ("inferd.models.olmo", "OlmoForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def model_class(architecture: str) -> type[nn.Module]:
    try:
        module_name, class_name = _ARCHITECTURES[architecture]
    except KeyError:
        raise ModelLoadError(
            f"unsupported architecture {architecture or '(none in config.json)'!r}; "
            f"supported: {', '.join(supported_architectures())}"
        ) from None
    cls: type[nn.Module] = getattr(importlib.import_module(module_name), class_name)
    return cls
