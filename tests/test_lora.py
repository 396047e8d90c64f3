"""LoRA adapters (PEFT's format) served beside the base model: logits and greedy tokens against
transformers with each adapter merged into the weights, batches mixing adapters and the base model,
a prefix cache kept apart per adapter, and adapters that cannot be served refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import make_lora_adapter as make_adapter

from inferd import LLM, SamplingParams
from inferd.config import ModelLoadError
from inferd.engine.input_processor import PromptError
from inferd.engine.request import Request


def merged(base: Path, adapter: Path, folder: Path) -> Path:
    """``base`` with the adapter merged into its weights: W + scale * B @ A."""
    shutil.copytree(base, folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = json.loads((adapter / "adapter_config.json").read_text())
    rank = config["r"]
    scale = config["lora_alpha"] / (rank**0.5 if config.get("use_rslora") else rank)
    from safetensors.torch import load_file

    pairs = load_file(adapter / "adapter_model.safetensors")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in pairs.items():
            if key.endswith("lora_A.weight"):
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = pairs[key.replace("lora_A", "lora_B")]
                modules[name].weight += scale * b @ a
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_model_factory, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tiny_model_factory("qwen3")
    root = tmp_path_factory.mktemp("lora")
    return {
        "all": make_adapter(base, root / "all", seed=1),
        # Attention only, rank-stabilised scaling.
        "attn": make_adapter(
            base, root / "attn", seed=2, rank=2, targets=("q_proj", "v_proj", "o_proj"), use_rslora=True
        ),  # fmt: skip
    }


def _logits(llm: LLM, prompt: list[int], adapter: str | None) -> torch.Tensor:
    core = llm.engine.core
    params = SamplingParams(max_tokens=1, adapter=adapter)
    core.add_request(Request(f"r-{adapter}", prompt, params, frozenset(), 1))
    return core.runner.logits_for(core.scheduler.schedule())


@pytest.mark.parametrize("name", ["all", "attn"])
def test_an_adapters_logits_are_the_merged_models(tiny_model_factory, adapters, tmp_path, name: str) -> None:
    base = tiny_model_factory("qwen3")
    prompt = list(range(5, 40))
    llm = LLM(base, kv_cache_memory="16MiB", block_size=8, lora_modules={name: str(adapters[name])})
    ours = _logits(llm, prompt, name)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        merged(base, adapters[name], tmp_path / "merged"), dtype=torch.float32
    )
    with torch.inference_mode():
        theirs = reference(torch.tensor([prompt])).logits[0]
        plain = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(
            torch.tensor([prompt])
        ).logits[0]
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (theirs - plain).abs().max().item() > 1e-2  # the adapter changes the answer


def test_one_batch_mixes_adapters_and_the_base_model(tiny_model_factory, adapters) -> None:
    """Each request's tokens as when it runs alone, with the prefix cache shared only within an
    adapter (the same prompt under each adapter and the base model twice over)."""
    base = tiny_model_factory("qwen3")
    modules = {name: str(path) for name, path in adapters.items()}
    llm = LLM(base, kv_cache_memory="16MiB", block_size=8, lora_modules=modules)
    prompt = list(range(5, 45))
    names = [None, "all", "attn", "all", None, "attn"]
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, adapter=n) for n in names]
    together = [out.token_ids for out in llm.generate([prompt] * len(names), params)]
    alone = {}
    for name in (None, "all", "attn"):
        fresh = LLM(base, kv_cache_memory="16MiB", block_size=8, lora_modules=modules)
        alone[name] = fresh.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                                              adapter=name))[0].token_ids  # fmt: skip
    assert together == [alone[name] for name in names]
    assert len({tuple(tokens) for tokens in alone.values()}) == 3  # the adapters answer differently
    # Run again: now each prompt's blocks are cached, each under its own adapter.
    again = [out.token_ids for out in llm.generate([prompt] * len(names), params)]
    assert again == together and llm.engine.stats().prefix_hits > 0


def test_an_unknown_adapter_is_refused(tiny_model_factory, adapters) -> None:
    llm = LLM(
        tiny_model_factory("qwen3"), kv_cache_memory="16MiB", lora_modules={"all": str(adapters["all"])}
    )
    with pytest.raises(PromptError, match="no LoRA adapter 'nope' in this engine"):
        llm.generate(["Hi"], SamplingParams(max_tokens=2, adapter="nope"))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"use_dora": True}, "use_dora not supported"),
        ({"bias": "all"}, "bias='all' not supported"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save not supported"),
    ],
)
def test_adapters_that_cannot_be_served_are_refused(tiny_model_factory, tmp_path, config, message) -> None:
    base = tiny_model_factory("qwen3")
    adapter = make_adapter(base, tmp_path / "a", seed=3, **config)
    with pytest.raises(ModelLoadError, match=message):
        LLM(base, kv_cache_memory="16MiB", lora_modules={"a": str(adapter)})


def test_an_adapter_whose_tensors_disagree_with_its_config_is_refused(tiny_model_factory, tmp_path) -> None:
    adapter = make_adapter(tiny_model_factory("qwen3"), tmp_path / "a", seed=4, targets=("q_proj",), rank=2)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(ModelLoadError, match="not of rank 3"):
        LLM(tiny_model_factory("qwen3"), kv_cache_memory="16MiB", lora_modules={"a": str(adapter)})
