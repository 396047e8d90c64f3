"""The shipped default model folder is complete, small, and loads with Hugging Face transformers."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

MAX_FOLDER_BYTES = 20 * 1000 * 1000
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


@pytest.fixture(scope="module")
def folder() -> Path:
    return Path(str(files("inferd").joinpath("data", "default_model")))


@pytest.fixture(scope="module")
def tokenizer(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_folder_has_every_file_and_fits_the_size_cap(folder: Path) -> None:
    for name in REQUIRED_FILES:
        assert (folder / name).is_file(), name
    total = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    assert total <= MAX_FOLDER_BYTES


def test_config_declares_llama_float32_and_rope(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == "float32"
    assert config["max_position_embeddings"] >= 256
    assert config["rope_theta"] > 0
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    generation = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    assert generation["eos_token_id"] == config["eos_token_id"]


def test_model_loads_and_scores_text(folder: Path, tokenizer) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer("ROMEO:\nBut soft, what light", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("text", ["ROMEO:\nBut soft, what light!", "café ünïcødé — 日本語 🎭"])
def test_tokenizer_round_trips_text(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=True)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_special_tokens_and_chat_template(tokenizer) -> None:
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.model_max_length >= 256
    messages = [{"role": "user", "content": "Good morrow."}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "USER:\nGood morrow.\n\nASSISTANT:\n"
