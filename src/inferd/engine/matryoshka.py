"""Shorter embeddings from a model trained for them (Matryoshka representation learning, as
Qwen3-Embedding is): an embedding's first ``dimensions`` values, normalized again, keep most of its
meaning. A model says it was so trained in config.json, as vLLM reads it: ``matryoshka_dimensions``
(the widths it was trained at) or ``is_matryoshka`` (any width); ``hf_overrides`` can say it for a
folder that does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from inferd.config import ModelConfig


def check_dimensions(model: ModelConfig, dimensions: int) -> None:
    """Refuse (ValueError) a width the model cannot give: its own always; a shorter one only if it
    was trained for it, and then one of the widths it names, if it names some."""
    width = model.hidden_size
    if dimensions == width:
        return
    if model.matryoshka is None:
        raise ValueError(f"the model gives {width}-dimensional embeddings and was not trained for shorter "
                         f"ones (config.json has no is_matryoshka or matryoshka_dimensions)")  # fmt: skip
    if not 1 <= dimensions <= width:
        raise ValueError(f"dimensions must be from 1 to the model's {width}, got {dimensions}")
    if model.matryoshka and dimensions not in model.matryoshka:
        raise ValueError(f"the model was trained for embeddings of {list(model.matryoshka)} dimensions, "
                         f"not {dimensions}")  # fmt: skip


def shortened(vector: Sequence[float], dimensions: int | None) -> list[float]:
    """``vector``'s first ``dimensions`` values, L2-normalized again (all of it as it is without)."""
    if dimensions is None or dimensions >= len(vector):
        return list(vector)
    head = [float(value) for value in vector[:dimensions]]
    norm = math.sqrt(sum(value * value for value in head))
    return [value / norm for value in head] if norm > 0 else head
