"""Runtime name -> loader. Each server builds its own registry; nothing is registered globally.

The built-in loaders import their backend (onnxruntime, torch, transformers) only when called,
so building the registry is cheap. Other packages add runtimes, e.g. `llm`, with `register`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from inferd.serving.config import ModelConfig
from inferd.serving.runtimes.base import Runtime, RuntimeLoader


@dataclass(frozen=True)
class RuntimeEntry:
    loader: RuntimeLoader
    # The `platform` string reported in v2 model metadata.
    platform: str


class RuntimeRegistry:
    def __init__(self) -> None:
        self._entries: dict[str, RuntimeEntry] = {}

    def register(self, name: str, loader: RuntimeLoader, platform: str | None = None) -> None:
        self._entries[name] = RuntimeEntry(loader=loader, platform=platform or name)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def platform(self, name: str) -> str:
        entry = self._entries.get(name)
        return entry.platform if entry else name

    def load(self, model_dir: Path, config: ModelConfig) -> Runtime:
        entry = self._entries.get(config.runtime)
        if entry is None:
            raise LookupError(
                f"no runtime registered for {config.runtime!r} (known: {', '.join(self.names())})"
            )
        return entry.loader(model_dir, config)


def _lazy_loader(module_name: str) -> RuntimeLoader:
    """A loader that imports `inferd.serving.runtimes.<module_name>` on first use and calls its `load`."""

    def load(model_dir: Path, config: ModelConfig) -> Runtime:
        module = importlib.import_module(f"inferd.serving.runtimes.{module_name}")
        return module.load(model_dir, config)

    return load


_BUILTIN_RUNTIMES = (
    ("onnx", "onnx_runtime", "onnxruntime_onnx"),
    ("torchscript", "torchscript_runtime", "pytorch_libtorch"),
    ("torch_export", "torch_export_runtime", "pytorch_export"),
    ("hf_sequence_classification", "hf_classification_runtime", "huggingface_sequence_classification"),
    ("sentence_embedding", "sentence_embedding_runtime", "sentence_embedding"),
)


def default_runtime_registry() -> RuntimeRegistry:
    """A fresh registry with the built-in classic-model runtimes (no `llm`: the engine registers that)."""
    registry = RuntimeRegistry()
    for name, module_name, platform in _BUILTIN_RUNTIMES:
        registry.register(name, _lazy_loader(module_name), platform=platform)
    return registry
