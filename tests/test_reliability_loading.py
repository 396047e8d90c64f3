"""Safe loading: weights only from safetensors, nothing named from inside a folder can lead outside it."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from server_process import run_server

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


def _rewrite_weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, folder / "model.safetensors")


def _halve_file(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (_halve_file, "model.safetensors is not a valid safetensors file"),
        (lambda folder: (folder / "model.safetensors").write_bytes(b""), "is not a valid safetensors file"),
        # One piece of the fused q|k|v projection: its rows would keep their initial values.
        (
            lambda folder: _rewrite_weights(folder, lambda w: w.pop(Q_PROJ)),
            f"checkpoint lacks tensors: {Q_PROJ}",
        ),
        (
            lambda folder: _rewrite_weights(folder, lambda w: w.update({Q_PROJ: w[Q_PROJ].to(torch.int32)})),
            "has dtype torch.int32; inferd loads floating-point weights",
        ),
        (
            lambda folder: (folder / "tokenizer.json").write_text('{"not": "a tokenizer"}'),
            "tokenizer.json is not a valid tokenizer file",
        ),
    ],
)
def test_a_broken_weight_or_tokenizer_file_is_a_load_error(
    tiny_llama: Path, tmp_path: Path, breakage: Callable[[Path], object], message: str
) -> None:
    """Not the reader's own exception, and never a model that loads with some weights unset."""
    folder = _copy(tiny_llama, tmp_path)
    breakage(folder)
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        LLMEngine.from_options(folder, kv_cache_memory="8MiB")


def _with_chat_template(tiny_llama: Path, tmp_path: Path, template: object) -> Path:
    folder = _copy(tiny_llama, tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


HELLO = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template", ["{% if %}", [{"name": "tool_use", "template": "x"}], {"a": 1}])
def test_a_chat_template_that_does_not_compile_fails_chat_alone(
    tiny_llama: Path, tmp_path: Path, caplog, template: object
) -> None:
    """Said at load (logged) and to each chat request, as the model's fault; completions still
    work. A list of named templates without a "default" one has none for chat."""
    from inferd.engine.tokenizer import BrokenChatTemplateError, Tokenizer

    folder = _with_chat_template(tiny_llama, tmp_path, template)
    with caplog.at_level("ERROR"):
        tokenizer = Tokenizer(folder)
    assert "tokenizer_config.json does not compile" in caplog.text
    with pytest.raises(BrokenChatTemplateError, match="tokenizer_config.json does not compile"):
        tokenizer.apply_chat_template(HELLO)
    assert tokenizer.encode("hi")


def test_the_default_entry_of_a_list_of_named_chat_templates_is_the_chat_one(
    tiny_llama: Path, tmp_path: Path
) -> None:
    from inferd.engine.tokenizer import Tokenizer

    named = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "{{ messages[0].content }}!"},
    ]
    assert Tokenizer(_with_chat_template(tiny_llama, tmp_path, named)).apply_chat_template(HELLO) == "hi!"


def test_chat_template_kwargs_reach_the_template(tiny_llama: Path, tmp_path: Path) -> None:
    """As Qwen3's template reads `enable_thinking`."""
    from inferd.engine.tokenizer import Tokenizer

    quick = "{% if enable_thinking is defined and not enable_thinking %} (quick){% endif %}"
    template = "{{ messages[0].content }}" + quick
    tokenizer = Tokenizer(_with_chat_template(tiny_llama, tmp_path, template))
    assert tokenizer.apply_chat_template(HELLO) == "hi"
    assert tokenizer.apply_chat_template(HELLO, template_kwargs={"enable_thinking": False}) == "hi (quick)"


KEEPS = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
TRIMS = "{% for m in messages %}[{{ m.content | trim }}]{% endfor %}"


@pytest.mark.parametrize(
    ("template", "text", "expected"),
    [
        (KEEPS, "The answer is ", "[hi][The answer is "),
        # A template that trims, as Llama 3's: the trailing space it dropped is not put back.
        (TRIMS, "The answer is ", "[hi][The answer is"),
        (TRIMS, " Sure\n", "[hi][Sure"),
    ],
)
def test_continue_final_message_ends_inside_the_last_message(
    tiny_llama: Path, tmp_path: Path, template: str, text: str, expected: str
) -> None:
    from inferd.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(_with_chat_template(tiny_llama, tmp_path, template))
    conversation = [*HELLO, {"role": "assistant", "content": text}]
    assert tokenizer.apply_chat_template(conversation, False, continue_final_message=True) == expected


def test_a_server_answers_chat_with_a_500_and_completions_as_usual(tiny_llama: Path, tmp_path: Path) -> None:
    """Before any stream starts, without the file's path, and without a traceback per request."""
    folder = _with_chat_template(tiny_llama, tmp_path, "{% if %}")
    with run_server(folder, "--kv-cache-memory", "8MiB") as server:
        for stream in (False, True):
            body = {"model": server.model, "messages": HELLO, "max_tokens": 2, "stream": stream}
            chat = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
            assert chat.status_code == 500
            message = chat.json()["error"]["message"]
            assert message == "the model's chat template does not compile; see the server's log"
        body = {"model": server.model, "prompt": "To be", "max_tokens": 2}
        assert httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=30).status_code == 200
        assert "Traceback" not in server.log_text()
    assert "tokenizer_config.json does not compile" in server.log_text()


def test_a_checkpoint_with_fused_projections_loads_as_the_separate_one(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """q|k|v and gate|up shipped fused (as inferd's own parameters are named) load whole."""
    from inferd.llm import LLM
    from inferd.sampling_params import SamplingParams

    def fuse(weights: dict[str, torch.Tensor]) -> None:
        for name in [n for n in weights if ".q_proj." in n]:
            parts = [weights.pop(name.replace("q_proj", piece)) for piece in ("q_proj", "k_proj", "v_proj")]
            weights[name.replace("q_proj", "qkv_proj")] = torch.cat(parts)
        for name in [n for n in weights if ".gate_proj." in n]:
            parts = [weights.pop(name.replace("gate_proj", piece)) for piece in ("gate_proj", "up_proj")]
            weights[name.replace("gate_proj", "gate_up_proj")] = torch.cat(parts)

    folder = _copy(tiny_llama, tmp_path)
    _rewrite_weights(folder, fuse)
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    texts = [LLM(f, kv_cache_memory="8MiB").generate("To be", greedy)[0].text for f in (tiny_llama, folder)]
    assert texts[0] == texts[1]


def test_a_folder_without_an_end_of_sequence_token_is_warned_about(
    tiny_llama: Path, tmp_path: Path, caplog
) -> None:
    """No eos id in generation_config.json or config.json, and an eos_token the tokenizer lacks."""
    folder = _copy(tiny_llama, tmp_path)
    (folder / "generation_config.json").unlink(missing_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config.pop("eos_token_id", None)
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**tokenizer_config, "eos_token": "<none here>"})
    )
    with caplog.at_level("WARNING"):
        engine = LLMEngine.from_options(folder, kv_cache_memory="8MiB")
    assert engine.inputs.eos_token_ids == frozenset()
    assert "names no end-of-sequence token the tokenizer knows" in caplog.text


def test_the_tokenizers_eos_ends_outputs_beside_generation_configs(tiny_llama: Path, tmp_path: Path) -> None:
    """A chat model's generation config may list only its end-of-turn tokens: the tokenizer's EOS
    still ends an answer, as vLLM reads both."""
    folder = _copy(tiny_llama, tmp_path)
    tokenizer_eos = LLMEngine.from_options(folder, kv_cache_memory="8MiB").tokenizer.eos_token_id
    assert tokenizer_eos is not None
    listed = [tokenizer_eos + 1, tokenizer_eos + 2]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": listed}))
    engine = LLMEngine.from_options(folder, kv_cache_memory="8MiB")
    assert engine.inputs.eos_token_ids == frozenset([*listed, tokenizer_eos])


def test_text_that_tokenizes_past_the_models_vocabulary_is_refused(tiny_llama: Path, caplog) -> None:
    """A folder whose tokenizer has more tokens than the model's embedding table: warned about at
    load, and a prompt whose text has such a token refused."""
    import dataclasses

    from inferd.engine.input_processor import InputProcessor, PromptError

    engine = LLMEngine.from_options(tiny_llama, kv_cache_memory="8MiB")
    ids = engine.inputs.tokenize_prompt("To be, or not to be")
    config = engine.config
    # As if the model's vocabulary ended below the largest of those ids.
    smaller = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=max(ids)))
    with caplog.at_level("WARNING"):
        inputs = InputProcessor(smaller, engine.inputs.tokenizer)
    assert f"but the model's vocab_size is {max(ids)}" in caplog.text
    with pytest.raises(PromptError, match="has tokens the model has no embedding for"):
        inputs.tokenize_prompt("To be, or not to be")
    assert inputs.tokenize_prompt([0, 1]) == [0, 1]


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
