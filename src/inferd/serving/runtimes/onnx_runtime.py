"""ONNX models through onnxruntime (CUDA when the installed build offers it, else CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inferd.serving.config import ModelConfig, resolve_artifact


class OnnxRuntime:
    def __init__(self, model_path: Path, output_names: list[str]) -> None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = onnxruntime.SessionOptions()
        # Idle intra-op threads would otherwise spin between calls, taking CPU from the event loop
        # that parses requests and feeds the batcher.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(str(model_path), options, providers=providers)
        graph_outputs = {o.name for o in self._session.get_outputs()}
        missing = [name for name in output_names if name not in graph_outputs]
        if missing:
            raise ValueError(f"outputs {missing} not in the ONNX graph (it has {sorted(graph_outputs)})")
        self._output_names = output_names

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._session.run(self._output_names, inputs)
        return dict(zip(self._output_names, values, strict=True))


def load(model_dir: Path, config: ModelConfig) -> OnnxRuntime:
    return OnnxRuntime(resolve_artifact(model_dir, config, "model.onnx"), [o.name for o in config.outputs])
