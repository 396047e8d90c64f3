"""ONNX models through onnxruntime (CUDA when the installed build offers it, else CPU).

As Triton's ONNX backend, the model loads only when its configuration agrees with the graph: each
configured input and output is one of the graph's, of the same datatype and shape (the batch
dimension a variable one when the model batches), and every input the graph needs is configured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from inferd.serving.config import ConfigError, ModelConfig, TensorSpec, resolve_artifact

# onnxruntime's type names -> v2 datatypes.
_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16",
    "tensor(string)": "BYTES",
}


class OnnxRuntime:
    def __init__(self, model_path: Path, config: ModelConfig) -> None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = onnxruntime.SessionOptions()
        # Idle intra-op threads would otherwise spin between calls, taking CPU from the event loop
        # that parses requests and feeds the batcher.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(str(model_path), options, providers=providers)
        check_signature(config, self._session.get_inputs(), self._session.get_outputs())
        self._output_names = [o.name for o in config.outputs]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._session.run(self._output_names, inputs)
        return dict(zip(self._output_names, values, strict=True))


def check_signature(config: ModelConfig, graph_inputs: list[Any], graph_outputs: list[Any]) -> None:
    """Raises ConfigError where the configuration's tensors disagree with the graph's
    (onnxruntime's `NodeArg`s: `name`, `type`, `shape`)."""
    inputs = {arg.name: arg for arg in graph_inputs}
    outputs = {arg.name: arg for arg in graph_outputs}
    missing = [name for name in inputs if name not in {spec.name for spec in config.inputs}]
    if missing:
        raise ConfigError(f"the ONNX graph needs inputs {missing} the configuration does not declare")
    for kind, specs, graph in (("input", config.inputs, inputs), ("output", config.outputs, outputs)):
        for spec in specs:
            arg = graph.get(spec.name)
            if arg is None:
                raise ConfigError(
                    f"{kind} {spec.name!r} is not in the ONNX graph (its {kind}s: {sorted(graph)})"
                )
            _check_tensor(config, spec, arg, kind)


def _check_tensor(config: ModelConfig, spec: TensorSpec, arg: Any, kind: str) -> None:
    datatype = _DATATYPES.get(arg.type, arg.type)
    if datatype != spec.datatype:
        raise ConfigError(
            f"{kind} {spec.name!r}: the configuration declares {spec.datatype}, the ONNX graph has {datatype}"
        )
    graph_shape = [d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape]
    if config.batched:
        if not graph_shape or graph_shape[0] != -1:
            raise ConfigError(
                f"{kind} {spec.name!r}: max_batch_size > 0 needs a variable first (batch) dimension, "
                f"the ONNX graph has shape {graph_shape}"
            )
        graph_shape = graph_shape[1:]
    # A variable graph dimension takes any configured one; a fixed one only itself.
    fits = len(graph_shape) == len(spec.shape) and all(
        g in (-1, d) for g, d in zip(graph_shape, spec.shape, strict=True)
    )
    if not fits:
        raise ConfigError(
            f"{kind} {spec.name!r}: the configuration declares shape {list(spec.shape)}"
            f"{' (after the batch dimension)' if config.batched else ''}, the ONNX graph has {graph_shape}"
        )


def load(model_dir: Path, config: ModelConfig) -> OnnxRuntime:
    return OnnxRuntime(resolve_artifact(model_dir, config, "model.onnx"), config)
