"""Hugging Face sequence-classification folders: text in, class scores, label index and confidence out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inferd.serving.config import ModelConfig
from inferd.serving.runtimes.hf_text import check_single_text_input, load_hf_folder, texts_of, tokenize

# Outputs this runtime can produce; the config picks any subset by name.
OUTPUT_NAMES = ("logits", "probabilities", "label", "confidence")


class SequenceClassificationRuntime:
    def __init__(self, model_dir: Path, config: ModelConfig) -> None:
        check_single_text_input(config)
        unknown = [o.name for o in config.outputs if o.name not in OUTPUT_NAMES]
        if unknown:
            raise ValueError(f"unknown outputs {unknown}; this runtime produces {list(OUTPUT_NAMES)}")
        self._tokenizer, self._model = load_hf_folder(model_dir, config, "AutoModelForSequenceClassification")
        self._config = config

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        batch = tokenize(self._tokenizer, self._model, self._config, texts_of(self._config, inputs))
        with torch.inference_mode():
            logits = self._model(**batch).logits.float()
        probabilities = torch.softmax(logits, dim=-1)
        confidence, label = probabilities.max(dim=-1, keepdim=True)
        produced = {
            "logits": logits,
            "probabilities": probabilities,
            "label": label,
            "confidence": confidence,
        }
        return {o.name: produced[o.name].numpy() for o in self._config.outputs}


def load(model_dir: Path, config: ModelConfig) -> SequenceClassificationRuntime:
    return SequenceClassificationRuntime(model_dir, config)
