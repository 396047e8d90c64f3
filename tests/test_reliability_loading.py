"""Safe loading: weights only from safetensors, nothing named from inside a folder can lead outside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from inferd.config import ModelLoadError
from inferd.engine.llm_engine import LLMEngine
from inferd.serving.config import ConfigError, is_valid_model_name, parse_model_config, resolve_artifact


def _copy(tiny_llama: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    return folder


def test_pickle_checkpoints_are_refused(tiny_llama: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama, tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        LLMEngine.from_options(folder, kv_cache_memory="8MiB")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "pytorch_model.bin"])
def test_index_cannot_name_shards_outside_the_folder_or_pickles(
    tiny_llama: Path, tmp_path: Path, shard: str
) -> None:
    folder = _copy(tiny_llama, tmp_path)
    (folder / "model.safetensors").rename(tmp_path / "outside.safetensors")
    shutil.copy(tmp_path / "outside.safetensors", folder / "pytorch_model.bin")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="outside the folder or not safetensors"):
        LLMEngine.from_options(folder, kv_cache_memory="8MiB")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("tokenizer_config.json", "{broken", "is not valid JSON"),
        ("generation_config.json", '["eos"]', "must hold a JSON object, not a list"),
        ("model.safetensors.index.json", '{"metadata": {}}', "has no 'weight_map' object"),
        (
            "model.safetensors.index.json",
            '{"weight_map": {"a": 3}}',
            "has no 'weight_map' object of file names",
        ),
    ],
)
def test_a_malformed_json_file_of_the_folder_is_named(
    tiny_llama: Path, tmp_path: Path, name: str, content: str, message: str
) -> None:
    """A load error that names the file, not a decoder's or a lookup's traceback."""
    folder = _copy(tiny_llama, tmp_path)
    (folder / name).write_text(content)
    with pytest.raises(ModelLoadError, match=f"{name} {message}"):
        LLMEngine.from_options(folder, kv_cache_memory="8MiB")


@pytest.mark.parametrize("artifact", ["../secret.onnx", "/etc/passwd", "link.onnx"])
def test_repository_artifacts_stay_inside_the_model_folder(tmp_path: Path, artifact: str) -> None:
    model_dir = tmp_path / "repo" / "m"
    model_dir.mkdir(parents=True)
    (tmp_path / "repo" / "secret.onnx").write_bytes(b"x")
    (model_dir / "link.onnx").symlink_to(tmp_path / "repo" / "secret.onnx")
    config = parse_model_config({"runtime": "onnx", "artifact": artifact}, "m")
    with pytest.raises(ConfigError, match="outside the model folder"):
        resolve_artifact(model_dir, config, "model.onnx")


@pytest.mark.parametrize("name", ["..", "../m", "a/b", "", ".hidden"])
def test_model_names_cannot_address_other_folders(name: str) -> None:
    assert not is_valid_model_name(name)
