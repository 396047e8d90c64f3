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
# Triton's configuration file, which this server does not read (a folder holding only it is listed
# as not ready, with that reason).
TRITON_CONFIG_FILE_NAME = "config.pbtxt"

# The keys of model.json and of each tensor in it: anything else (a Triton option such as
# `instance_group`, `reshape` or `optional`) is refused rather than silently not applied.
_MODEL_KEYS = (
    "name",
    "runtime",
    "artifact",
    "version",
    "max_batch_size",
    "max_queue_delay_ms",
    "dynamic_batching",
    "labels",
    "inputs",
    "outputs",
    "parameters",
)
_TENSOR_KEYS = ("name", "datatype", "shape")
# Triton's `dynamic_batching` fields this server applies.
_DYNAMIC_BATCHING_KEYS = ("max_queue_delay_microseconds", "preferred_batch_size")
# Triton's names (config.pbtxt's) for keys model.json spells otherwise.
_TRITON_SPELLINGS = {"input": "inputs", "output": "outputs", "dims": "shape", "data_type": "datatype"}

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
    # Triton's preferred_batch_size: a batch that reaches one of these row counts runs at once.
    preferred_batch_sizes: tuple[int, ...] = ()
    labels: tuple[str, ...] = ()
    # Runtime-specific options, e.g. `max_length` for tokenizers.
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    def metadata_shape(self, spec: TensorSpec) -> list[int]:
        return ([-1] if self.batched else []) + list(spec.shape)


def _refuse_unknown_keys(raw: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    """Names each key not in ``known`` (with model.json's spelling of a Triton key) and lists those
    that are supported."""
    unknown = [key for key in raw if key not in known]
    if not unknown:
        return
    hints = [
        f" (model.json spells {key!r} as {_TRITON_SPELLINGS[key]!r})"
        for key in unknown
        if key in _TRITON_SPELLINGS
    ]
    raise ConfigError(
        f"{where} has unsupported key(s) {', '.join(map(repr, unknown))}{''.join(hints)}; "
        f"supported: {', '.join(known)}"
    )


def _tensor_spec(raw: Any, where: str) -> TensorSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object")
    _refuse_unknown_keys(raw, _TENSOR_KEYS, where)
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
    _refuse_unknown_keys(raw, _MODEL_KEYS, CONFIG_FILE_NAME)
    name = raw.get("name", folder_name)
    if not isinstance(name, str) or not is_valid_model_name(name):
        raise ConfigError(f"invalid model name {name!r}")
    runtime = raw.get("runtime")
    if not isinstance(runtime, str) or not runtime:
        raise ConfigError("runtime must be a non-empty string")
    max_batch_size = raw.get("max_batch_size", 0)
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise ConfigError("max_batch_size must be a non-negative integer")
    delay = raw.get("max_queue_delay_ms", 0)
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
        raise ConfigError("max_queue_delay_ms must be a non-negative number")
    enabled, batching_delay_ms, preferred = _dynamic_batching(
        raw.get("dynamic_batching", True), max_batch_size
    )
    if batching_delay_ms is not None:
        if "max_queue_delay_ms" in raw:
            raise ConfigError(
                "give the queue delay once: max_queue_delay_ms or "
                "dynamic_batching.max_queue_delay_microseconds"
            )
        delay = batching_delay_ms
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
        dynamic_batching=enabled,
        preferred_batch_sizes=preferred,
        labels=tuple(labels),
        parameters=parameters,
    )


def _dynamic_batching(raw: Any, max_batch_size: int) -> tuple[bool, float | None, tuple[int, ...]]:
    """`dynamic_batching`: true or false, or Triton's object (`{}` turns it on with the defaults).
    Returns whether it is on, the queue delay in milliseconds the object gives (None: not given)
    and the preferred batch sizes, ascending."""
    if isinstance(raw, bool):
        return raw, None, ()
    if not isinstance(raw, dict):
        raise ConfigError(
            f"dynamic_batching must be true, false or an object as Triton's ({{}}: on), got {raw!r}"
        )
    _refuse_unknown_keys(raw, _DYNAMIC_BATCHING_KEYS, "dynamic_batching")
    delay_us = _delay_microseconds(raw.get("max_queue_delay_microseconds"))
    preferred = raw.get("preferred_batch_size", [])
    if not isinstance(preferred, list) or not all(
        isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= max_batch_size
        for size in preferred
    ):
        raise ConfigError(
            f"dynamic_batching.preferred_batch_size must be a list of integers in 1..max_batch_size "
            f"({max_batch_size}), got {preferred!r}"
        )
    return True, None if delay_us is None else delay_us / 1000.0, tuple(sorted(set(preferred)))


def _delay_microseconds(raw: Any) -> int | None:
    """A whole number of microseconds, or its digits as text (protobuf's JSON writes uint64 so, as
    Triton's configuration extension answers it)."""
    if raw is None:
        return None
    if isinstance(raw, str) and raw.isdigit():
        return int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ConfigError(
            f"dynamic_batching.max_queue_delay_microseconds must be a non-negative integer, got {raw!r}"
        )
    return raw


def missing_config_reason(model_dir: Path) -> str:
    """Why a folder without model.json is no model here (a Triton layout's is named as such)."""
    if (model_dir / TRITON_CONFIG_FILE_NAME).is_file():
        return f"no {CONFIG_FILE_NAME}; {TRITON_CONFIG_FILE_NAME} is not read"
    return f"no {CONFIG_FILE_NAME}"


def read_model_config(model_dir: Path) -> ModelConfig:
    path = model_dir / CONFIG_FILE_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(missing_config_reason(model_dir)) from None
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
