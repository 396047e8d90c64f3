"""Chooses an attention backend by name; GPU backends are imported only when asked for."""

from __future__ import annotations

import importlib

from inferd.attention.base import AttentionBackend

_BACKENDS = {
    "torch": ("inferd.attention.torch_backend", "TorchAttentionBackend"),
    "triton": ("inferd.attention.triton_backend", "TritonAttentionBackend"),
}


def resolve_backend_name(name: str, device: str) -> str:
    if name == "auto":
        return "triton" if device.startswith("cuda") else "torch"
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose auto, {', '.join(_BACKENDS)}")
    return name


def create_backend(name: str, device: str) -> AttentionBackend:
    module_name, class_name = _BACKENDS[resolve_backend_name(name, device)]
    backend: AttentionBackend = getattr(importlib.import_module(module_name), class_name)()
    return backend
