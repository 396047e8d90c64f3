"""The sampling defaults a model folder's `generation_config.json` recommends.

Model authors ship their recommended sampling there (Qwen3: temperature 0.6, top_p 0.95, top_k
20). The OpenAI routes use these values for the fields a request leaves out, as vLLM does with
its default `--generation-config auto`; a request's own values always win. Its `max_new_tokens`
becomes the default output budget (`max_tokens`) of chat requests that set none, where the
context would otherwise be the only limit.
"""

from __future__ import annotations

import logging
from pathlib import Path

from inferd.config import read_json_object

logger = logging.getLogger(__name__)

# generation_config.json's names of the sampling fields that carry over, all numbers.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_INTEGER_FIELDS = ("top_k",)


def read_sampling_defaults(folder: Path) -> dict[str, float | int]:
    """The recommended values of `SAMPLING_FIELDS` in `folder/generation_config.json` (none when the
    file is absent, or says `do_sample: false`: its numbers are then not used by its own library
    either), and its `max_new_tokens` as `max_tokens` (which its library uses either way). A field
    that is not a number (a positive integer for `max_new_tokens`) is left out with a warning."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    config = read_json_object(path)
    defaults: dict[str, float | int] = {}
    budget = config.get("max_new_tokens")
    if budget is not None:
        if isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1:
            defaults["max_tokens"] = budget
        else:
            logger.warning("%s: max_new_tokens is %r, not a positive integer; left out", path, budget)
    if config.get("do_sample") is False:
        return defaults
    for name in SAMPLING_FIELDS:
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            logger.warning("%s: %s is %r, not a number; left out of the sampling defaults", path, name, value)
            continue
        if name in _INTEGER_FIELDS:
            if isinstance(value, float) and not value.is_integer():
                logger.warning("%s: %s is %r, not a whole number; left out of the sampling defaults",
                               path, name, value)  # fmt: skip
                continue
            value = int(value)  # 20.0, as some configs write top_k
        defaults[name] = value
    return defaults
