"""TorchScript programs (`torch.jit.save`); no pickled Python objects are ever loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inferd.serving.config import ModelConfig, resolve_artifact
from inferd.serving.runtimes.torch_convert import to_numpy_outputs, to_torch_arguments


class TorchScriptRuntime:
    def __init__(self, model_path: Path, config: ModelConfig) -> None:
        import torch

        self._module = torch.jit.load(str(model_path), map_location="cpu").eval()
        self._config = config

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            result = self._module(*to_torch_arguments(self._config, inputs))
        return to_numpy_outputs(self._config, result)


def load(model_dir: Path, config: ModelConfig) -> TorchScriptRuntime:
    return TorchScriptRuntime(resolve_artifact(model_dir, config, "model.ts"), config)
