"""Shared by the Hugging Face runtimes: safetensors-only loading and tokenizing a BYTES batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from inferd.serving.config import ModelConfig, resolve_artifact


def load_hf_folder(model_dir: Path, config: ModelConfig, auto_class_name: str) -> tuple[Any, Any]:
    """(tokenizer, model in eval mode) from a `save_pretrained` folder; `use_safetensors` refuses pickles."""
    import transformers

    folder = resolve_artifact(model_dir, config, ".")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    auto_class = getattr(transformers, auto_class_name)
    model = auto_class.from_pretrained(str(folder), use_safetensors=True).eval()
    return tokenizer, model


def texts_of(config: ModelConfig, inputs: dict[str, np.ndarray]) -> list[str]:
    """The batch's texts: the single BYTES input flattened, one text per row."""
    (spec,) = config.inputs
    return [bytes(v).decode("utf-8") for v in inputs[spec.name].reshape(-1)]


def tokenize(tokenizer: Any, model: Any, config: ModelConfig, texts: list[str]) -> Any:
    """The texts as a padded batch, each cut to ``max_length`` tokens (the model.json parameter,
    128 by default), and never past the positions the encoder has."""
    max_length = int(config.parameters.get("max_length", 128))
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        max_length = min(max_length, positions)
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def check_single_text_input(config: ModelConfig) -> None:
    if len(config.inputs) != 1 or config.inputs[0].datatype != "BYTES":
        raise ValueError(f"{config.runtime} models take exactly one BYTES input")
