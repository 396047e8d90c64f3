"""A checkpoint's calibrated KV-cache scales (``models/kv_scales.py``): with an 8-bit KV cache the
engine stores ``k / k_scale`` and ``v / v_scale``, checked against transformers with an attention
that reads its keys and values so rounded, and scaled back."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from quantized_checkpoints import make_checkpoint, make_fp8_checkpoint, widened_copy
from safetensors.torch import load_file, save_file
from test_lora import merged
from tiny_models import copy_with_tensors, greedy_continuations, make_lora_adapter
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from inferd import LLM, SamplingParams
from inferd.config import ModelLoadError
from inferd.engine.request import Request
from inferd.models.kv_scales import kv_scale_of

_ATTENTION = "inferd_test_scaled_fp8_kv"
# layer -> (k_scale, v_scale) the reference attention reads with; powers of two, so that folding
# them into the weights is exact and the rounding to e4m3 the same as the reference's.
_SCALES: dict[int, tuple[float, float]] = {}


def _rounded(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(x.dtype) * scale


def _scaled_fp8_kv_attention(module, query, key, value, *args, **kwargs):
    k_scale, v_scale = _SCALES[module.layer_idx]
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, _rounded(key, k_scale), _rounded(value, v_scale), *args, **kwargs)


transformers.AttentionInterface.register(_ATTENTION, _scaled_fp8_kv_attention)
AttentionMaskInterface.register(_ATTENTION, eager_mask)

# Both layers' scales, each spelt as one of the checkpoints that carry them spells it.
SCALES = {0: (1 / 16, 4.0), 1: (8.0, 1 / 32)}


def with_kv_scales(source: Path, folder: Path, spelling: str = "attention") -> Path:
    shutil.copytree(source, folder)
    tensors = load_file(folder / "model.safetensors")
    for layer, (k_scale, v_scale) in SCALES.items():
        prefix = f"model.layers.{layer}.self_attn"
        k, v = torch.tensor(k_scale), torch.tensor(v_scale)
        if spelling == "attention":  # llm-compressor's kv_cache_scheme
            tensors[f"{prefix}.k_scale"], tensors[f"{prefix}.v_scale"] = k, v
        elif spelling == "projections":  # AutoFP8's, at the projections
            tensors[f"{prefix}.k_proj.k_scale"], tensors[f"{prefix}.v_proj.v_scale"] = k[None], v[None]
        elif spelling == "output_scale":  # older llm-compressor checkpoints
            tensors[f"{prefix}.k_proj.output_scale"], tensors[f"{prefix}.v_proj.output_scale"] = k, v
        else:  # one scale for both: the layer's keys' (SCALES' k_scale)
            tensors[f"{prefix}.kv_scale"] = k
    save_file(tensors, folder / "model.safetensors")
    return folder


def _their_logits(folder: Path, prompt: list[int], scales: dict[int, tuple[float, float]]) -> torch.Tensor:
    _SCALES.clear()
    _SCALES.update(scales)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=_ATTENTION
    ).eval()
    with torch.inference_mode():
        return model(torch.tensor([prompt])).logits[0]


def _our_logits(folder: Path, prompt: list[int], **options) -> torch.Tensor:
    llm = LLM(folder, kv_cache_memory="4MiB", block_size=8, **options)
    core = llm.engine.core
    core.add_request(Request("r", prompt, SamplingParams(max_tokens=1), frozenset(), 1))
    return core.runner.logits_for(core.scheduler.schedule())


def _prompt(vocab: int, length: int = 41, seed: int = 3) -> list[int]:
    return [(seed * 7 + 13 * i) % vocab for i in range(length)]


@pytest.mark.parametrize(
    ("arch", "spelling"),
    [("llama", "attention"), ("qwen2", "projections"), ("qwen3", "attention"), ("gemma2", "output_scale"),
     ("mistral", "kv_scale"), ("olmo2", "attention")],
)  # fmt: skip
def test_the_cache_holds_keys_and_values_divided_by_their_scales(
    tiny_model_factory, tmp_path, arch, spelling
) -> None:
    """Llama (the k rows of the projection scaled, and the scores' scale), Qwen2 (with their
    biases), Qwen3 (its k norm scaled instead), Gemma 2 (capped scores), Mistral (one kv_scale),
    OLMo 2 (its whole-projection k norm scaled); each spelling of the scales' names."""
    folder = with_kv_scales(tiny_model_factory(arch), tmp_path / "m", spelling)
    prompt = _prompt(200)
    ours = _our_logits(folder, prompt, kv_cache_dtype="fp8")
    scales = {layer: (k, k) for layer, (k, _) in SCALES.items()} if spelling == "kv_scale" else SCALES
    assert (ours - _their_logits(folder, prompt, scales)).abs().max().item() < 1e-4
    # The scales matter: read unscaled, the cache gives other logits.
    unscaled = _their_logits(folder, prompt, dict.fromkeys(SCALES, (1.0, 1.0)))
    assert (ours - unscaled).abs().max().item() > 1e-3


def test_decode_steps_read_the_scaled_cache_back(tiny_model_factory, tmp_path) -> None:
    folder = with_kv_scales(tiny_model_factory("qwen2"), tmp_path / "m")
    prompts = [_prompt(200, n, seed=n) for n in (5, 19, 33)]
    _SCALES.clear()
    _SCALES.update(SCALES)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=_ATTENTION
    ).eval()
    expected = greedy_continuations(model, prompts, 10)
    llm = LLM(folder, kv_cache_memory="4MiB", block_size=8, kv_cache_dtype="fp8")
    outputs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outputs] == expected


def test_an_fp8_checkpoints_kv_cache_scheme_scales_its_low_bit_projections(
    tiny_model_factory, tmp_path
) -> None:
    """llm-compressor's FP8 with ``kv_cache_scheme``: the q|k|v and o projections are 8-bit, so the
    factors go onto their scales."""
    low_bit = make_checkpoint(tiny_model_factory("llama"), tmp_path / "fp8", "ct-channel")
    config = json.loads((low_bit / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                        "dynamic": False, "symmetric": True}  # fmt: skip
    (low_bit / "config.json").write_text(json.dumps(config))
    folder = with_kv_scales(low_bit, tmp_path / "m")
    widened = widened_copy(low_bit, tmp_path / "wide")
    prompt = _prompt(200)
    ours = _our_logits(folder, prompt, kv_cache_dtype="fp8")
    assert (ours - _their_logits(widened, prompt, SCALES)).abs().max().item() < 1e-4


def test_a_16_bit_cache_leaves_the_scales_out(tiny_model_factory, tmp_path, caplog) -> None:
    source = tiny_model_factory("llama")
    folder = with_kv_scales(source, tmp_path / "m")
    prompt = _prompt(200)
    assert torch.equal(_our_logits(folder, prompt), _our_logits(source, prompt))
    assert "calibrated KV-cache scales are not applied" in caplog.text


def test_scales_that_cannot_be_applied_are_refused(tiny_model_factory, tmp_path) -> None:
    source = tiny_model_factory("llama")
    scaled = with_kv_scales(source, tmp_path / "scaled")

    cases = [
        (lambda t: t.pop("model.layers.1.self_attn.v_scale"), r"every layer \(layers \[1\]\)"),
        (
            lambda t: t.update({"model.layers.0.self_attn.k_scale": torch.tensor(0.0)}),
            "scales must be positive",
        ),
        (lambda t: t.update({"model.layers.0.self_attn.k_scale": torch.ones(2)}), "per-head scales are not"),
        (lambda t: t.update({"model.layers.0.self_attn.kv_scale": torch.tensor(3.0)}), "contradicts another"),
    ]
    for i, (edit, message) in enumerate(cases):
        with pytest.raises(ModelLoadError, match=message):
            LLM(
                copy_with_tensors(scaled, tmp_path / f"c{i}", edit),
                kv_cache_memory="4MiB",
                kv_cache_dtype="fp8",
            )


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_lora_adapters_take_the_scales_on_their_b_rows(tiny_model_factory, tmp_path, arch: str) -> None:
    """An adapter on q, k, v and o (and the MLP) over a scaled checkpoint: its logits are the merged
    model's, read through the scaled cache (Llama's k rows take the factor, Qwen3's k norm does)."""
    folder = with_kv_scales(tiny_model_factory(arch), tmp_path / "m")
    adapter = make_lora_adapter(folder, tmp_path / "adapter", seed=3)
    prompt = _prompt(200)
    llm = LLM(
        folder, kv_cache_memory="4MiB", block_size=8, kv_cache_dtype="fp8", lora_modules={"a": str(adapter)}
    )
    core = llm.engine.core
    core.add_request(Request("r", prompt, SamplingParams(max_tokens=1, adapter="a"), frozenset(), 1))
    ours = core.runner.logits_for(core.scheduler.schedule())
    theirs = _their_logits(merged(folder, adapter, tmp_path / "merged"), prompt, SCALES)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_what_the_fold_cannot_take_is_refused(tiny_model_factory, tmp_path) -> None:
    """Gemma 3's key norm (1 + weight), blocks of weight that straddle the keys and values of a
    checkpoint that ships q|k|v fused (Phi-3), and a kv_cache_scheme without its scales."""
    with pytest.raises(ModelLoadError, match="not supported for this architecture's key norms"):
        LLM(
            with_kv_scales(tiny_model_factory("gemma3"), tmp_path / "g"),
            kv_cache_memory="4MiB",
            kv_cache_dtype="fp8",
        )
    phi3 = make_fp8_checkpoint(tiny_model_factory("phi3"), tmp_path / "p", "fp8-block", block_size=(48, 32))
    with pytest.raises(ModelLoadError, match="blocks of 48 rows that straddle"):
        LLM(with_kv_scales(phi3, tmp_path / "ps"), kv_cache_memory="4MiB", kv_cache_dtype="fp8")
    low_bit = make_checkpoint(tiny_model_factory("llama"), tmp_path / "fp8", "ct-channel")
    config = json.loads((low_bit / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "dynamic": False}
    (low_bit / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="kv_cache_scheme promises calibrated KV-cache scales"):
        LLM(low_bit, kv_cache_memory="4MiB", kv_cache_dtype="fp8")
    config["quantization_config"]["kv_cache_scheme"]["symmetric"] = False
    (low_bit / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="symmetric: false"):
        LLM(low_bit, kv_cache_memory="4MiB", kv_cache_dtype="fp8")


def test_scale_names_as_the_checkpoints_spell_them() -> None:
    assert kv_scale_of("model.layers.3.self_attn.k_scale") == (3, "k")
    assert kv_scale_of("model.layers.3.self_attn.v_proj.v_scale") == (3, "v")
    assert kv_scale_of("model.layers.0.self_attn.kv_scale") == (0, "kv")
    assert kv_scale_of("model.layers.0.self_attn.k_proj.v_scale") is None
    assert kv_scale_of("model.layers.0.self_attn.k_proj.weight_scale") is None
    assert kv_scale_of("model.layers.2.self_attn.attn.v_scale") == (2, "v")
    assert kv_scale_of("model.layers.2.self_attn.v_proj.output_scale") == (2, "v")
    assert kv_scale_of("model.layers.2.self_attn.o_proj.output_scale") is None
