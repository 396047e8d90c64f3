"""Shared by the torch runtimes: numpy inputs to torch arguments, torch results to numpy outputs."""

from __future__ import annotations

from typing import Any

import numpy as np

from inferd.serving.config import ModelConfig


def to_torch_arguments(config: ModelConfig, inputs: dict[str, np.ndarray]) -> list[Any]:
    """Positional arguments in config order; BYTES inputs become a flat list of str (List[str])."""
    import torch

    arguments: list[Any] = []
    for spec in config.inputs:
        array = inputs[spec.name]
        if spec.datatype == "BYTES":
            arguments.append([bytes(v).decode("utf-8") for v in array.reshape(-1)])
        elif spec.datatype == "BF16":
            arguments.append(torch.from_numpy(np.ascontiguousarray(array)).to(torch.bfloat16))
        else:
            arguments.append(torch.from_numpy(np.ascontiguousarray(array)))
    return arguments


def to_numpy_outputs(config: ModelConfig, result: Any) -> dict[str, np.ndarray]:
    """Maps a tensor, a tuple/list of tensors (config order) or a dict of tensors to the outputs."""
    import torch

    names = [spec.name for spec in config.outputs]
    if isinstance(result, torch.Tensor):
        values = [result]
    elif isinstance(result, dict):
        values = [result[name] for name in names]
    else:
        values = list(result)
    if len(values) != len(names):
        raise ValueError(f"the model returned {len(values)} outputs, the config declares {len(names)}")
    return {
        name: value.detach().to(torch.float32 if value.dtype == torch.bfloat16 else value.dtype).cpu().numpy()
        for name, value in zip(names, values, strict=True)
    }
