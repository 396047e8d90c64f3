"""Sentence embeddings from a Hugging Face encoder folder: token states averaged under the attention mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inferd.serving.config import ModelConfig
from inferd.serving.runtimes.hf_text import check_single_text_input, load_hf_folder, texts_of, tokenize

OUTPUT_NAMES = ("embedding", "token_count")


class SentenceEmbeddingRuntime:
    def __init__(self, model_dir: Path, config: ModelConfig) -> None:
        check_single_text_input(config)
        unknown = [o.name for o in config.outputs if o.name not in OUTPUT_NAMES]
        if unknown:
            raise ValueError(f"unknown outputs {unknown}; this runtime produces {list(OUTPUT_NAMES)}")
        self._tokenizer, self._model = load_hf_folder(model_dir, config, "AutoModel")
        self._normalize = bool(config.parameters.get("normalize", True))
        self._config = config

    @property
    def embedding_width(self) -> int | None:
        """The width of the embeddings (the encoder's hidden size), known before any inference;
        None for an encoder whose configuration does not name it."""
        width = getattr(self._model.config, "hidden_size", None)
        return width if isinstance(width, int) else None

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        batch = tokenize(self._tokenizer, self._model, self._config, texts_of(self._config, inputs))
        with torch.inference_mode():
            states = self._model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        token_count = mask.sum(dim=1)
        embedding = (states * mask).sum(dim=1) / token_count.clamp(min=1.0)
        if self._normalize:
            embedding = torch.nn.functional.normalize(embedding, dim=-1)
        produced = {"embedding": embedding, "token_count": token_count.to(torch.int64)}
        return {o.name: produced[o.name].numpy() for o in self._config.outputs}


def load(model_dir: Path, config: ModelConfig) -> SentenceEmbeddingRuntime:
    return SentenceEmbeddingRuntime(model_dir, config)
