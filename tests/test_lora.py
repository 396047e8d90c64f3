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
    # A cache salt keeps an adapter's blocks apart from the same adapter's unsalted ones, and its
    # tokens are the adapter's.
    before = llm.engine.stats().prefix_hits
    salted = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, adapter="all", cache_salt="t")
    assert llm.generate([prompt], salted)[0].token_ids == alone["all"]
    assert llm.engine.stats().prefix_hits == before
    assert llm.generate([prompt], salted)[0].token_ids == alone["all"]
    assert llm.engine.stats().prefix_hits == before + 32


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
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication not supported"),
        ({"peft_type": "IA3"}, "peft_type='IA3' not supported"),
        # Loaded, then every answer through it was NaN logits (a 500); and a 500 from the load.
        ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
        ({"r": float("inf")}, "needs an integer 'r'"),
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


def test_an_adapter_of_weights_that_are_not_finite_is_refused(tiny_model_factory, tmp_path) -> None:
    """Its requests would answer nothing but a NaN's tokens: refused at load, naming the module."""
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(tiny_model_factory("qwen3"), tmp_path / "a", seed=4, targets=("q_proj",), rank=2)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(ModelLoadError, match="weights that are not finite numbers"):
        LLM(tiny_model_factory("qwen3"), kv_cache_memory="16MiB", lora_modules={"a": str(adapter)})


def test_phi3_adapters_target_its_fused_projections(tiny_model_factory, tmp_path) -> None:
    """Phi-3's checkpoints, and so PEFT's adapters for it, have q|k|v and gate|up fused."""
    base = tiny_model_factory("phi3")
    adapter = make_adapter(
        base, tmp_path / "phi", seed=6, targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    )
    llm = LLM(base, kv_cache_memory="16MiB", block_size=8, lora_modules={"phi": str(adapter)})
    prompt = list(range(5, 30))
    reference = transformers.AutoModelForCausalLM.from_pretrained(merged(base, adapter, tmp_path / "m"))
    with torch.inference_mode():
        theirs = reference(torch.tensor([prompt])).logits[0]
    assert (_logits(llm, prompt, "phi") - theirs).abs().max().item() < 1e-4


def test_an_adapter_without_lora_alpha_takes_pefts_default(tiny_model_factory, tmp_path) -> None:
    base = tiny_model_factory("qwen3")
    explicit = make_adapter(base, tmp_path / "explicit", seed=7, alpha=8.0)
    implicit = make_adapter(base, tmp_path / "implicit", seed=7)
    config = json.loads((implicit / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (implicit / "adapter_config.json").write_text(json.dumps(config))
    llm = LLM(base, kv_cache_memory="16MiB", lora_modules={"e": str(explicit), "i": str(implicit)})
    prompt = list(range(5, 20))
    torch.testing.assert_close(_logits(llm, prompt, "i"), _logits(llm, prompt, "e"))


def test_an_adapter_named_as_the_served_model_is_refused(tiny_model_factory, adapters) -> None:
    from inferd.engine.async_llm import AsyncLLM
    from inferd.server.app import create_app
    from inferd.server.config import ServerConfig

    llm = AsyncLLM.from_options(tiny_model_factory("qwen3"), engine_process=False, kv_cache_memory="8MiB",
                                lora_modules={"tiny": str(adapters["all"])})  # fmt: skip
    try:
        for config in (
            ServerConfig(served_model_name="tiny"),
            ServerConfig(served_model_name="base", model_aliases=("tiny",)),
        ):
            with pytest.raises(ValueError, match="is the served model's name"):
                create_app(llm, config)
    finally:
        llm.shutdown()


def test_the_warm_ups_largest_step_mixes_adapters_and_the_base_model(
    tiny_model_factory, adapters, monkeypatch
) -> None:
    """As served batches do, so the adapters' gathered rows and terms count in the step's peak
    memory the warm-up checks at start-up."""
    from inferd.layers.lora import LoraBatch

    seen: list[list[tuple[str | None, int]]] = []
    set_rows = LoraBatch.set_rows
    monkeypatch.setattr(LoraBatch, "set_rows", lambda self, rows: seen.append(rows) or set_rows(self, rows))
    LLM(tiny_model_factory("qwen3"), kv_cache_memory="8MiB", warm_up=True, max_num_batched_tokens=64,
        lora_modules={"all": str(adapters["all"])})  # fmt: skip
    largest = max(seen, key=lambda rows: sum(count for _, count in rows))
    assert sum(count for _, count in largest) == 64 and {name for name, _ in largest} == {None, "all"}


def test_generate_answers_with_an_adapter(tiny_model_factory, adapters, capsys) -> None:
    from inferd.cli import main

    base = tiny_model_factory("qwen3")
    # The prompt first: --lora-modules takes every word after it.
    common = ["generate", "To be", "--model", str(base), "--max-tokens", "8", "--temperature", "0",
              "--kv-cache-memory", "8MiB", "--lora-modules", f"all={adapters['all']}"]  # fmt: skip
    assert main(common) == 0
    plain = capsys.readouterr().out
    assert main([*common, "--adapter", "all"]) == 0
    expected = (
        LLM(base, kv_cache_memory="8MiB", lora_modules={"all": str(adapters["all"])})
        .generate(["To be"], SamplingParams(max_tokens=8, temperature=0.0, adapter="all"))[0]
        .text
    )
    assert capsys.readouterr().out == f"To be{expected}\n" != plain
    assert main([*common, "--adapter", "nope"]) == 2
    assert "no LoRA adapter 'nope'" in capsys.readouterr().err


def test_the_engine_reports_the_adapters_its_requests_use(tiny_model_factory, adapters) -> None:
    """What the metrics' lora_requests_info shows (the gateway's LoRA affinity reads it)."""
    from prometheus_client import CollectorRegistry

    from inferd.server.metrics import ServerMetrics

    base = tiny_model_factory("qwen3")
    modules = {name: str(path) for name, path in adapters.items()}
    llm = LLM(base, kv_cache_memory="16MiB", block_size=8, lora_modules=modules, max_num_seqs=1)
    engine = llm.engine
    long = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, adapter="all")
    engine.add_request("a", list(range(5, 25)), long)
    engine.add_request("b", list(range(5, 25)), SamplingParams(max_tokens=2, adapter="attn"))
    engine.add_request("c", list(range(5, 25)), SamplingParams(max_tokens=2))
    engine.step()  # one runs (max_num_seqs 1), two wait
    stats = engine.stats()
    assert (stats.running_adapters, stats.waiting_adapters, stats.num_adapters) == (("all",), ("attn",), 2)
    registry = CollectorRegistry()
    ServerMetrics(registry, "m", engine.stats)
    labels = {
        "model_name": "m",
        "max_lora": "2",
        "running_lora_adapters": "all",
        "waiting_lora_adapters": "attn",
    }
    assert registry.get_sample_value("inferd:lora_requests_info", labels) > 0
    # An engine without adapters shows no such gauge.
    plain = LLM(base, kv_cache_memory="16MiB")
    assert plain.engine.stats().running_adapters is None
    bare = CollectorRegistry()
    ServerMetrics(bare, "m", plain.engine.stats)
    assert "lora_requests_info" not in str(list(bare.collect()))
