"""Per-model configuration: one `model.json` in each model folder of the repository.

Tensor shapes exclude the batch dimension when `max_batch_size > 0` (as in Triton): the batch
dimension is implicit, variable and reported as -1 in metadata. -1 marks any other variable dimension.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferd.serving.datatypes import DATATYPES

CONFIG_FILE_NAME = "model.json"

# Letters, digits, '_', '-', '.', not starting with '.': a name can never be a path outside the repository.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class ConfigError(ValueError):
    """The model folder's configuration is invalid; the message says which field and why."""


def is_valid_model_name(name: str) -> bool:
    return bool(_MODEL_NAME.match(name)) and ".." not in name


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    runtime: str
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    version: str = "1"
    # File or folder inside the model folder holding the weights; runtimes pick a default when None.
    artifact: str | None = None
    max_batch_size: int = 0
    max_queue_delay_ms: float = 0.0
    dynamic_batching: bool = True
    labels: tuple[str, ...] = ()
    # Runtime-specific options, e.g. `max_length` for tokenizers.
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    def metadata_shape(self, spec: TensorSpec) -> list[int]:
        return ([-1] if self.batched else []) + list(spec.shape)


def _tensor_spec(raw: Any, where: str) -> TensorSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object")
    name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name must be a non-empty string")
    if datatype not in DATATYPES:
        raise ConfigError(f"{where}.datatype must be one of {sorted(DATATYPES)}, got {datatype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and (d > 0 or d == -1) for d in shape):
        raise ConfigError(f"{where}.shape must be a list of positive integers or -1")
    return TensorSpec(name=name, datatype=datatype, shape=tuple(shape))


def _tensor_specs(raw: dict[str, Any], key: str) -> tuple[TensorSpec, ...]:
    items = raw.get(key, [])
    if not isinstance(items, list):
        raise ConfigError(f"{key} must be a list")
    specs = tuple(_tensor_spec(item, f"{key}[{i}]") for i, item in enumerate(items))
    if len({s.name for s in specs}) != len(specs):
        raise ConfigError(f"{key} has duplicate tensor names")
    return specs


def parse_model_config(raw: Any, folder_name: str) -> ModelConfig:
    """Validates a decoded `model.json`; the model name defaults to the folder name."""
    if not isinstance(raw, dict):
        raise ConfigError("the configuration must be a JSON object")
    name = raw.get("name", folder_name)
    if not isinstance(name, str) or not is_valid_model_name(name):
        raise ConfigError(f"invalid model name {name!r}")
    runtime = raw.get("runtime")
    if not isinstance(runtime, str) or not runtime:
        raise ConfigError("runtime must be a non-empty string")
    max_batch_size = raw.get("max_batch_size", 0)
    if not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise ConfigError("max_batch_size must be a non-negative integer")
    delay = raw.get("max_queue_delay_ms", 0)
    if not isinstance(delay, (int, float)) or delay < 0:
        raise ConfigError("max_queue_delay_ms must be a non-negative number")
    labels = raw.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ConfigError("labels must be a list of strings")
    artifact = raw.get("artifact")
    if artifact is not None and not isinstance(artifact, str):
        raise ConfigError("artifact must be a relative path string")
    parameters = raw.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ConfigError("parameters must be an object")
    return ModelConfig(
        name=name,
        runtime=runtime,
        inputs=_tensor_specs(raw, "inputs"),
        outputs=_tensor_specs(raw, "outputs"),
        version=str(raw.get("version", "1")),
        artifact=artifact,
        max_batch_size=max_batch_size,
        max_queue_delay_ms=float(delay),
        dynamic_batching=bool(raw.get("dynamic_batching", True)),
        labels=tuple(labels),
        parameters=parameters,
    )


def read_model_config(model_dir: Path) -> ModelConfig:
    path = model_dir / CONFIG_FILE_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"missing {CONFIG_FILE_NAME}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{CONFIG_FILE_NAME} is not valid JSON: {exc}") from None
    return parse_model_config(raw, model_dir.name)


def resolve_artifact(model_dir: Path, config: ModelConfig, default: str) -> Path:
    """The artifact's path, refusing anything that resolves outside the model folder (`..`, symlinks)."""
    relative = config.artifact or default
    folder = model_dir.resolve()
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder):
        raise ConfigError(f"artifact {relative!r} is outside the model folder")
    if not path.exists():
        raise ConfigError(f"artifact {relative!r} not found")
    return path
